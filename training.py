"""The training step main.py and bench.py share: the model, objective and optimisers a run trains,
one SGD step from torch's own parts (train_step), and what an epoch accumulates from its steps."""

import argparse
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from datasets import Dataset, ImageData, channel_stats
from distributed import gather_batch
from losses import CENTER_ACC_LOSSES, Objective, RowSGD, paper_center_update
from models import build_model

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
    """What one training step needs: the model, the module the step calls (DDP, compiled), objective, optimisers."""

    model: nn.Module
    net: nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    center_optimizer: RowSGD | None  # many classes: SGD on the batch's centers
    scaler: torch.amp.GradScaler  # fp16: the loss scale; otherwise 1, only the skip of bad steps
    fp16: bool
    autocast: Callable[[], AbstractContextManager]
    channels_last: bool
    clip_grad_norm: float  # 0: off
    center_alpha: float | None  # the paper's center update's rate; None: centers learn by SGD


@dataclass
class Run(Trainer):
    """A training run: trainer, settings, folder, data (on the device: fast path) and progress so far."""

    args: argparse.Namespace
    dir: Path
    device: torch.device
    rank: int
    world: int
    train: ImageData
    test: ImageData
    val: ImageData | None
    unseen: ImageData | None  # test images of the classes --train-classes leaves out (open set)
    augmentations: tuple[str, ...]
    collect_frames: bool  # 2-D features drawn each epoch
    frame_take: int = 0  # train points each step keeps for the train frame (spread over the epoch)
    scheduler: ReduceLROnPlateau | None = None
    history: list[dict] = field(default_factory=list)  # the metrics.csv rows
    train_seconds: float = 0.0
    samples: int = 0
    bad_steps: int = 0  # steps taken back in finished epochs


def build_trainer(
    args: argparse.Namespace, data: Dataset, device: torch.device, world: int = 1
) -> Trainer:
    """Model, objective, optimisers, GradScaler and autocast from main.py's settings, in a fixed order after
    seeding (same --seed, same weights). Weight decay: the model only; paper centers: no optimiser."""
    torch.manual_seed(args.seed)  # the only generator the weights draw from
    stats = channel_stats(data.train.images) if args.model == "lenet++" else (None, None)
    classes = len(data.classes)
    model = build_model(
        args.model, data.channels, classes, args.feat_dim, data.image_size, *stats, width=args.width
    ).to(device)
    if args.loss in CENTER_ACC_LOSSES:  # logits unused: no gradient, and DDP must not wait for one
        model.classifier.requires_grad_(False)
    if world > 1 and device.type == "cuda":  # global batch statistics (SyncBatchNorm needs a GPU)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    sparse = args.center_update == "sgd" and classes > args.batch_size  # many classes
    terms = (args.weight_cent, args.weight_intra, args.weight_inter, args.inter_margin, args.alpha)
    objective = Objective(args.loss, classes, args.feat_dim, *terms, sparse).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    groups = [{"params": model.parameters(), "weight_decay": args.weight_decay}]
    if args.center_update == "paper":
        objective.centers.requires_grad_(False)
    elif not objective.sparse_centers:  # sparse centers: RowSGD below
        groups.append({"params": objective.parameters(), "lr": args.lr_cent})
    # fused: one kernel per group, and GradScaler hands it found_inf, so a skipped step needs no host sync.
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, fused=True)
    add_momentum_buffers(optimizer)
    dtype, net = AMP_DTYPES[args.amp], model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return Trainer(
        model=model,
        net=torch.compile(net, mode=args.compile) if args.compile else net,
        objective=objective,
        optimizer=optimizer,
        center_optimizer=RowSGD(objective.centers, args.lr_cent, args.momentum)
        if objective.sparse_centers
        else None,
        scaler=torch.amp.GradScaler(device.type, init_scale=2.0**16 if args.amp == "fp16" else 1.0),
        fp16=args.amp == "fp16",
        autocast=(lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext,
        channels_last=args.channels_last,
        clip_grad_norm=args.clip_grad_norm,
        center_alpha=args.center_alpha,
    )


def cuda_backends(device: torch.device) -> None:
    """On CUDA: cuDNN autotuning (the shapes never change) and float32 in float32, not TF32 (cuDNN's
    default for convolutions; --amp bf16 is the fast setting), by flags every torch from 2.4 on has."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def make_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace) -> ReduceLROnPlateau:
    """The study's schedule: lr x --factor once the accuracy has not risen by the relative --threshold for more
    than --patience epochs (mode max); the study's 0.1 is never met above 1 / 1.1 ~ 0.91 (docs/fidelity.md)."""
    return ReduceLROnPlateau(
        optimizer, mode="max", factor=args.factor, patience=args.patience, threshold=args.threshold
    )


def add_momentum_buffers(optimizer: torch.optim.Optimizer) -> None:
    """A zero momentum buffer for every trained parameter that has none: SGD's first step creates them
    with empty_like, left uninitialised if the GradScaler skips it; m * 0 + g = g is that step exactly."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if group["momentum"] and p.requires_grad:
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))


def train_step(trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One SGD step through the GradScaler, which skips it on the device when a gradient is not finite
    (docs/resuming.md): forward, loss (float32), backward of loss * (1 if the loss is finite else NaN),
    clipping (if on), fused SGD, RowSGD on the batch's centers (many classes), the paper's update (if on); a
    skipped step's buffers (BatchNorm statistics) are put back. Under torchrun the loss sees the
    global batch. Returns (features, logits, labels, loss, terms, bad, finite), detached: finite is whether the
    step was applied, its loss and every gradient finite; bad, whether it counts towards --max-bad-steps: every
    step not applied but fp16's overflows of a finite loss while the scale can still back off (its search).
    """
    optimizer, scaler, centers = trainer.optimizer, trainer.scaler, trainer.objective.centers
    if trainer.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    buffers = list(trainer.model.buffers())
    saved = [b.clone() for b in buffers]
    with trainer.autocast():
        features, logits = trainer.net(x)
    features, logits, y = gather_batch(features, logits, y)
    loss, terms = trainer.objective(features, logits, y)
    loss_ok = torch.isfinite(loss.detach())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss * torch.where(loss_ok, 1.0, math.nan)).backward()
    scaler.unscale_(optimizer)  # the true gradients, for the check and the clipping
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    # max |g| per tensor: NaN or inf exactly when the scaler finds a non-finite gradient (its found_inf)
    norms = torch.stack([torch.linalg.vector_norm(p.grad, math.inf) for p in params])
    apply = torch.isfinite(norms).all()
    finite = loss_ok & apply  # a step that is not applied learned nothing, whatever the precision
    search = loss_ok & ~apply & (scaler.scale(torch.ones((), device=loss.device)) > 1)
    if trainer.clip_grad_norm:  # the dense gradients only
        nn.utils.clip_grad_norm_(params, trainer.clip_grad_norm)
    scaler.step(optimizer)
    if trainer.center_optimizer is not None:  # the rows' gradient, unseen by the scaler, is scaled
        criterion = trainer.objective.criterion
        unscaled = criterion.rows.grad / scaler.scale(torch.ones((), device=criterion.rows.device))
        rows_ok = trainer.center_optimizer.step(criterion.labels, unscaled, apply)
        finite = finite & (rows_ok | ~apply)  # rows a skipped step did not write are not its fault
    if trainer.center_alpha is not None:
        finite = finite & paper_center_update(
            centers, features.detach().float(), y, trainer.center_alpha, apply
        )
    for buffer, before in zip(buffers, saved):
        buffer.copy_(torch.where(apply, buffer, before))
    scaler.update(None if trainer.fp16 else 1.0)  # fp16: backs off after an overflow; else stays 1
    terms = {name: term.detach() for name, term in terms.items()}
    return features.detach(), logits.detach(), y, loss.detach(), terms, ~finite & ~search, finite


TERMS = ("xent", "intra", "inter")


@dataclass
class EpochState:
    """What one epoch accumulates from its steps, on the training device but `step` (no step waits for the
    host); a mid-epoch checkpoint saves it as a plain dict. Skipped steps count only in skipped, bad_steps and last_bad."""

    loss_sums: torch.Tensor  # float64: sums of the loss and its TERMS over the good steps
    correct: torch.Tensor  # good steps' train samples that the run's accuracy rule gets right
    class_sum: torch.Tensor  # C x D: per-class sums of train features (nearest-class-mean accuracy)
    class_count: torch.Tensor  # C
    bad_steps: torch.Tensor  # int64: bad steps (train_step), towards --max-bad-steps
    last_bad: torch.Tensor  # float64: step, loss and TERMS of the last bad step, for the message
    aug: torch.Tensor  # state of the augmentation generator after the last step
    step: int = 0
    frame_features: list[torch.Tensor] = field(default_factory=list)  # the 2-D frame's train points
    frame_labels: list[torch.Tensor] = field(default_factory=list)
    # int64: steps not applied (None: a checkpoint from before it)
    skipped: torch.Tensor | None = None

    @classmethod
    def new(
        cls, num_classes: int, feat_dim: int, device: torch.device, aug: torch.Generator
    ) -> "EpochState":
        return cls(
            loss_sums=torch.zeros(1 + len(TERMS), dtype=torch.float64, device=device),
            correct=torch.zeros((), dtype=torch.int64, device=device),
            class_sum=torch.zeros(num_classes, feat_dim, device=device),
            class_count=torch.zeros(num_classes, device=device),
            bad_steps=torch.zeros((), dtype=torch.int64, device=device),
            last_bad=torch.zeros(2 + len(TERMS), dtype=torch.float64, device=device),
            aug=aug.get_state(),
            skipped=torch.zeros((), dtype=torch.int64, device=device),
        )

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def add(self, loss, terms: dict, features, labels, correct, finite, bad) -> None:
        """Count one step's loss, terms, correct predictions and features (tensors), or, if it was not
        applied (finite), only the skip and, if it was bad, the bad step (torch.where: no host sync)."""
        zero = loss.new_zeros(())
        values = torch.stack([loss, *(terms.get(t, zero) for t in TERMS)]).detach().double()
        self.step += 1
        self.bad_steps += bad
        if self.skipped is not None:
            self.skipped += ~finite
        self.last_bad = torch.where(
            ~bad, self.last_bad, torch.cat([values.new_full((1,), self.step), values])
        )
        self.loss_sums += torch.where(finite, values, 0)
        self.correct += torch.where(finite, correct, 0)
        self.class_sum.index_add_(0, labels, torch.where(finite, features, 0))
        self.class_count.index_add_(0, labels, finite.float().expand(len(labels)))

    def good_steps(self) -> int:
        """Steps that were not skipped (a host sync: for logging, not for the step)."""
        return self.step - int(self.bad_steps if self.skipped is None else self.skipped)
