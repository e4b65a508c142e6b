"""The training step main.py and bench.py share: the model, objective and optimiser a run trains,
one SGD step guarded against non-finite losses, gradients and weights without a host sync (one
function, train_step), and what an epoch accumulates from its steps."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn

from datasets import Dataset, ImageData, channel_stats
from distributed import gather_batch
from losses import CENTER_ACC_LOSSES, Objective, center_rows_grad, optimizer_center_step, paper_center_update, rows_grad_norm
from models import build_model
from utils import seed_everything

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# What --weight-decay and --clip-grad-norm (0: off) default to per model. The study's ResNet trains
# without either; LeNet++, with no batch normalisation, takes the center-loss paper's weight decay and
# clipped gradients, which bound its first steps (README, Command line).
MODEL_RECIPES = {
    "resnet": {"weight_decay": 0.0, "clip_grad_norm": 0.0},
    "lenet++": {"weight_decay": 5e-4, "clip_grad_norm": 10.0},
}


@dataclass
class Trainer:
    """What one training step needs: the model (and the module the step calls: DDP and/or compiled),
    the objective with its centers, SGD, the fp16 GradScaler and the autocast context."""

    model: nn.Module
    net: nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    parameters: list[torch.Tensor]  # everything the optimiser steps
    scaler: torch.amp.GradScaler | None
    autocast: Callable[[], AbstractContextManager]
    channels_last: bool
    clip_grad_norm: float  # 0: off
    center_alpha: float | None  # the paper's center update's rate; None: centers learn by SGD
    bn_stats: list[torch.Tensor]  # the BatchNorm running statistics, flat (batchnorm_stats)
    bn_saved: list[torch.Tensor]  # their copies from before the step's forward


@dataclass
class Run(Trainer):
    """A training run: its trainer, settings, folder, data on the training device (fast path) and
    progress so far, which a checkpoint saves."""

    args: argparse.Namespace
    dir: Path
    device: torch.device
    rank: int
    world: int
    train: ImageData
    test: ImageData
    val: ImageData | None
    unseen: ImageData | None  # test images of the classes left out by --train-classes (open-set retrieval)
    augmentations: tuple[str, ...]
    collect_frames: bool  # 2-D features drawn each epoch
    frame_take: int = 0  # train points each step keeps for the train frame (spread over the epoch)
    graph: GraphedStep | None = None  # --cuda-graph
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None
    history: list[dict] = field(default_factory=list)  # the metrics.csv rows
    train_seconds: float = 0.0
    samples: int = 0
    bad_steps: int = 0  # steps taken back in finished epochs


def build_trainer(args: argparse.Namespace, data: Dataset, device: torch.device, world: int = 1) -> Trainer:
    """Model, objective, SGD optimiser, GradScaler (fp16 only) and autocast from main.py's settings,
    built in a fixed order after seeding, so that the same --seed gives the same initial weights.
    Weight decay applies to the model only; with --center-update paper the centers are left out
    of the optimiser (train_step moves them)."""
    seed_everything(args.seed)
    stats = channel_stats(data.train.images) if args.model == "lenet++" else (None, None)
    model = build_model(args.model, data.channels, len(data.classes), args.feat_dim, data.image_size, *stats, width=args.width).to(device)
    if args.loss in CENTER_ACC_LOSSES:  # logits unused: no gradient, and DDP must not wait for one
        model.classifier.requires_grad_(False)
    if world > 1 and device.type == "cuda":  # batch statistics over the global batch (SyncBatchNorm needs a GPU)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    objective = Objective(
        args.loss,
        len(data.classes),
        args.feat_dim,
        args.weight_cent,
        args.weight_intra,
        args.weight_inter,
        args.inter_margin,
        args.alpha,
        # SGD on the batch's rows only where classes outnumber the batch: with fewer, every class is
        # (nearly) in every batch, the dense C x D update costs no more than the rows, and it stays one
        # fused kernel that a CUDA graph can capture (sparse gradients cannot be traced).
        sparse_centers=args.center_update == "sgd" and len(data.classes) > args.batch_size,
    ).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    groups = [{"params": model.parameters(), "weight_decay": args.weight_decay}]
    if args.center_update == "paper":
        objective.centers.requires_grad_(False)
    else:
        groups.append({"params": objective.parameters(), "lr": args.lr_cent})
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum)  # its state and settings; train_step runs its fused kernel
    add_momentum_buffers(optimizer)
    bn_stats = batchnorm_stats(model)
    dtype = AMP_DTYPES[args.amp]
    # A captured CUDA graph must not reuse autocast's cached casts of the weights (torch's CUDA graph notes).
    cache = not args.cuda_graph
    autocast: Callable[[], AbstractContextManager] = (
        (lambda: torch.autocast(device.type, dtype=dtype, cache_enabled=cache)) if dtype else nullcontext
    )
    return Trainer(
        model=model,
        net=compile_and_wrap(model, args.compile, device, world),
        objective=objective,
        optimizer=optimizer,
        parameters=[p for group in optimizer.param_groups for p in group["params"]],
        scaler=torch.amp.GradScaler(device.type) if args.amp == "fp16" else None,
        autocast=autocast,
        channels_last=args.channels_last,
        clip_grad_norm=args.clip_grad_norm,
        center_alpha=args.center_alpha,
        bn_stats=bn_stats,
        bn_saved=[stats.clone() for stats in bn_stats],
    )


def cuda_backends(device: torch.device) -> None:
    """On CUDA: cuDNN autotuning (the shapes never change) and float32 convolutions in float32. cuDNN
    would run them in TF32 (a 10-bit mantissa) by default; float32 means float32 here, as on the
    study's GPUs, and --amp bf16 is the fast setting."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.conv.fp32_precision = "ieee"


def make_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    """The study's schedule: lr x --factor once the monitored accuracy has not risen by the relative
    --threshold for more than --patience epochs (mode max). With the study's 0.1 that is never met
    once the accuracy is above 1 / 1.1 ~ 0.91 (docs/fidelity.md)."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=args.factor, patience=args.patience, threshold=args.threshold
    )


def compile_and_wrap(model: nn.Module, compile_model: bool, device: torch.device, world: int) -> nn.Module:
    """The module the training step calls: DistributedDataParallel under torchrun, compiled on request."""
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if compile_model else model


# A weight beyond this after an update counts as divergence: float32 ends at 3.4e38, and the bound
# train_step checks is computed in float32, so it must stay clear of overflowing itself.
UPDATE_LIMIT = 1e38
FLOAT32_MAX = torch.finfo(torch.float32).max


def batchnorm_stats(model: nn.Module) -> list[torch.Tensor]:
    """Every BatchNorm running statistic of `model` re-made as a view of one flat tensor per dtype
    (running means and variances, batch counts), which are returned. A bad step's forward has moved
    them; one torch.where per flat tensor takes that back, instead of one per buffer. Call after the
    model has reached its device and memory format: moving it again would undo the views."""
    buffers: dict[torch.dtype, list[tuple[nn.Module, str, torch.Tensor]]] = {}
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for name, buffer in module.named_buffers(recurse=False):  # (models.ResNet has no batch counters)
                buffers.setdefault(buffer.dtype, []).append((module, name, buffer))
    flats = []
    for items in buffers.values():
        flat = torch.cat([buffer.reshape(-1) for _, _, buffer in items])
        offset = 0
        for module, name, buffer in items:
            setattr(module, name, flat[offset : offset + buffer.numel()].view_as(buffer))
            offset += buffer.numel()
        flats.append(flat)
    return flats


def add_momentum_buffers(optimizer: torch.optim.Optimizer) -> None:
    """A zero momentum buffer for every trained parameter that has none (a new optimiser, or one loaded
    from a checkpoint made before its first step). With dampening 0, m * 0 + g = g is exactly SGD's
    first step, so the fused kernel treats every step alike, and a skipped first step leaves no
    uninitialised buffer behind (the kernel's own first step would create them with empty_like)."""
    for group in optimizer.param_groups:
        if group["momentum"]:
            for p in group["params"]:
                if p.requires_grad and optimizer.state[p].get("momentum_buffer") is None:
                    optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def train_step(trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One guarded SGD step, top to bottom: forward, loss (float32), backward, guard, clipping (if on),
    SGD update and the paper's center update (if on). Nothing here waits for the host, so that a CUDA
    graph can capture it (main.py --cuda-graph).

    The guard judges before anything is updated. A step is applied only if the loss is finite and a
    bound on every updated weight is below UPDATE_LIMIT: SGD with rate lr, momentum m and weight decay
    wd gives |p'| <= |p| + lr (wd |p| + m |buf| + |g|) elementwise, so the max-abs norms of weights,
    momentum buffers and gradients (one fused norm) bound the new weights without computing them, and
    a non-finite gradient makes the bound non-finite. SGD's fused kernel takes the verdict as its
    found_inf flag (GradScaler's mechanism) and skips the update on the device; the BatchNorm
    statistics the forward moved go back by one torch.where per dtype. The centers of cent and
    standalone move by rows (losses.paper_center_update, or losses.optimizer_center_step: SGD with
    lazy momentum on the batch's rows), written only for a step that is applied and judged by
    whether their new rows are finite. Under fp16 a step whose gradients overflow is the
    GradScaler's routine search for a scale: skipped (the scale backs off), not a bad step.
    Under torchrun the loss sees the global batch (distributed.gather_batch).
    Returns (features, logits, labels, loss, terms, finite), detached: the global batch's labels, and
    whether the step was good (a bad step was skipped).
    """
    model, objective, optimizer, scaler = trainer.net, trainer.objective, trainer.optimizer, trainer.scaler
    if trainer.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for saved, stats in zip(trainer.bn_saved, trainer.bn_stats):
        saved.copy_(stats)
    with trainer.autocast():
        features, logits = model(x)
    features, logits, y = gather_batch(features, logits, y)
    loss, terms = objective(features, logits, y)

    groups = optimizer.param_groups
    # Centers that move by rows (the paper's update, or SGD on the batch's rows: losses.py) are stepped
    # apart from the dense parameters, so that their cost follows the batch, not the number of classes.
    row_centers = objective.centers if trainer.center_alpha is not None or objective.sparse_centers else None
    stepped = [[p for p in g["params"] if p.requires_grad and p is not row_centers] for g in groups]
    params = [p for ps in stepped for p in ps]
    for p in params + ([row_centers] if row_centers is not None else []):  # zero_grad(set_to_none=True), traceable
        p.grad = None
    (loss if scaler is None else scaler.scale(loss)).backward()
    rows = center_rows_grad(row_centers) if objective.sparse_centers else None  # the batch's rows of the centers' gradient
    if scaler is not None:
        scaler.unscale_(optimizer)  # the true gradients, for the guard and the clipping
        if rows is not None:  # the scaler unscales only the optimiser's dense gradients (its scale stays on the device)
            rows = rows._replace(sums=rows.sums / scaler._get_scale_async())
    grads = [p.grad for p in params]
    momentum = groups[0]["momentum"]
    buffers = [optimizer.state[p]["momentum_buffer"] for p in params] if momentum else []
    p_max, b_max, g_max = torch.stack(torch._foreach_norm(params + (buffers or grads) + grads, math.inf)).view(3, -1).amax(1)
    lr, wd = max(g["lr"] for g in groups), max(g["weight_decay"] for g in groups)
    # alpha must fit float32: a larger lr makes the bound overflow, and the step bad, all the same
    bound = torch.add(p_max if wd == 0 else p_max * (1 + lr * wd), torch.add(g_max, b_max, alpha=momentum), alpha=min(lr, FLOAT32_MAX))
    finite = torch.isfinite(loss) & (bound < UPDATE_LIMIT)
    apply = finite if scaler is None else finite & torch.isfinite(g_max)
    if scaler is not None:  # overflowing fp16 gradients are the scaler's to skip, not a bad step
        finite = finite | (torch.isfinite(loss) & ~torch.isfinite(g_max))

    if trainer.clip_grad_norm:  # scale by min(1, max_norm / norm) on the device: no host sync
        norms = [*torch._foreach_norm(grads), *([rows_grad_norm(rows)] if rows is not None else [])]
        norm = torch.linalg.vector_norm(torch.stack(norms))
        torch._foreach_mul_(grads + ([rows.sums] if rows is not None else []), (trainer.clip_grad_norm / (norm + 1e-6)).clamp(max=1.0))
    # The centers' rows move first, only for a step that is applied; new rows that are not finite make
    # the step bad, and then nothing else moves either.
    if trainer.center_alpha is not None:
        rows_ok = paper_center_update(row_centers, features.detach().float(), y, trainer.center_alpha, apply)
    elif rows is not None:
        rows_ok = optimizer_center_step(optimizer, row_centers, rows, apply)
    if row_centers is not None:
        finite, apply = finite & rows_ok, apply & rows_ok
    skip = (~apply).float()
    for g, ps in zip(groups, stepped):  # SGD's fused kernel, called directly: optimizer.step() breaks a compiled graph
        torch._fused_sgd_(
            ps,
            [p.grad for p in ps],
            [optimizer.state[p]["momentum_buffer"] for p in ps] if momentum else [],
            weight_decay=g["weight_decay"],
            momentum=momentum,
            lr=g["lr"],
            dampening=g["dampening"],
            nesterov=g["nesterov"],
            maximize=g["maximize"],
            is_first_step=False,
            found_inf=skip,
        )
    for saved, stats in zip(trainer.bn_saved, trainer.bn_stats):
        torch.where(apply, stats, saved, out=stats)
    if scaler is not None:
        scaler.update()  # backs the scale off after overflowing gradients (recorded by unscale_)
    terms = {name: term.detach() for name, term in terms.items()}
    return features.detach(), logits.detach(), y, loss.detach(), terms, finite


class GraphedStep:
    """train_step captured once in a CUDA graph and replayed (--cuda-graph): one launch per step
    instead of hundreds. The first WARMUP steps run eagerly on a side stream, as CUDA graph capture
    requires (cuDNN autotuning, allocations); the batch then goes through static input buffers.
    The learning rates are constants of the captured kernels: when the scheduler changes them, the
    step is captured again. If capture fails, the run says so in one line and goes on eagerly."""

    WARMUP = 3

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.graph: torch.cuda.CUDAGraph | None = None
        self.lrs: list[float] = []
        self.warm = 0
        self.failed = False

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        trainer = self.trainer
        if self.failed:
            return train_step(trainer, x, y)
        if self.warm < self.WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                outputs = train_step(trainer, x, y)
            torch.cuda.current_stream().wait_stream(side)
            self.warm += 1
            return outputs
        lrs = [g["lr"] for g in trainer.optimizer.param_groups]
        if self.graph is None or lrs != self.lrs:
            try:
                self.capture(x, y, lrs)
            except Exception as exc:  # noqa: BLE001 - any capture failure falls back to the eager step
                self.failed, self.graph = True, None
                print(f"--cuda-graph: capturing the step failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                      "training goes on without a CUDA graph", flush=True)  # fmt: skip
                return train_step(trainer, x, y)
        self.x.copy_(x)
        self.y.copy_(y)
        self.graph.replay()
        return self.outputs

    def capture(self, x: torch.Tensor, y: torch.Tensor, lrs: list[float]) -> None:
        self.x, self.y = x.clone(), y.clone()
        self.trainer.optimizer.zero_grad(set_to_none=True)  # the gradients are allocated in the graph's memory pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.outputs = train_step(self.trainer, self.x, self.y)
        self.graph, self.lrs = graph, lrs


TERMS = ("xent", "intra", "inter")


@dataclass
class EpochState:
    """What one epoch accumulates from its steps. Everything but `step` lives on the training device,
    so that no step waits for the host; a mid-epoch checkpoint saves it whole (as a plain dict:
    weights_only loading accepts no classes). Non-finite steps were taken back and count nowhere
    but in `bad_steps` and `last_bad`."""

    loss_sums: torch.Tensor  # float64: sums of the loss and its TERMS over the good steps
    correct: torch.Tensor  # good steps' train samples that the run's accuracy rule gets right
    class_sum: torch.Tensor  # C x D: per-class sums of train features (nearest-class-mean accuracy)
    class_count: torch.Tensor  # C
    bad_steps: torch.Tensor  # int64: steps taken back
    last_bad: torch.Tensor  # float64: step, loss and TERMS of the last bad step, for the error message
    aug: torch.Tensor  # state of the augmentation generator after the last step
    step: int = 0
    frame_features: list[torch.Tensor] = field(default_factory=list)  # train points of the 2-D frame
    frame_labels: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def new(cls, num_classes: int, feat_dim: int, device: torch.device, aug: torch.Generator) -> EpochState:
        return cls(
            loss_sums=torch.zeros(1 + len(TERMS), dtype=torch.float64, device=device),
            correct=torch.zeros((), dtype=torch.int64, device=device),
            class_sum=torch.zeros(num_classes, feat_dim, device=device),
            class_count=torch.zeros(num_classes, device=device),
            bad_steps=torch.zeros((), dtype=torch.int64, device=device),
            last_bad=torch.zeros(2 + len(TERMS), dtype=torch.float64, device=device),
            aug=aug.get_state(),
        )

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def add(
        self, loss: torch.Tensor, terms: dict, features: torch.Tensor, labels: torch.Tensor, correct: torch.Tensor, finite: torch.Tensor
    ) -> None:
        """Count one step's loss, terms, correct predictions and features, or, if it was not
        finite, only the bad step itself (with torch.where: no host sync)."""
        values = torch.stack([loss.detach()] + [terms[t].detach() if t in terms else loss.new_zeros(()) for t in TERMS]).double()
        self.step += 1
        self.bad_steps += ~finite
        self.last_bad = torch.where(finite, self.last_bad, torch.cat([values.new_full((1,), self.step), values]))
        self.loss_sums += torch.where(finite, values, 0)
        self.correct += torch.where(finite, correct, 0)
        self.class_sum.index_add_(0, labels, torch.where(finite, features, 0))
        self.class_count.index_add_(0, labels, finite.float().expand(len(labels)))

    def good_steps(self) -> int:
        """Steps that were not taken back (a host sync: for logging, not for the step)."""
        return self.step - int(self.bad_steps)
