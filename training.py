"""The training step main.py and bench.py share: the model, objective and optimiser a run trains,
one SGD step guarded against non-finite losses, gradients and weights without a host sync, and
what an epoch accumulates from its steps."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn

from datasets import Dataset, ImageData, channel_stats
from distributed import gather_batch
from losses import CENTER_ACC_LOSSES, ClassSums, Objective, center_rows_grad, optimizer_center_step, paper_center_update, rows_grad_norm
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
    augmentations: tuple[str, ...]
    collect_frames: bool  # 2-D features drawn each epoch
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None
    history: list[dict] = field(default_factory=list)  # the metrics.csv rows
    train_seconds: float = 0.0
    samples: int = 0
    bad_steps: int = 0  # steps taken back in finished epochs


def build_trainer(args: argparse.Namespace, data: Dataset, device: torch.device, world: int = 1) -> Trainer:
    """Model, objective, SGD optimiser, GradScaler (fp16 only) and autocast from main.py's settings,
    built in a fixed order after seeding, so that the same --seed gives the same initial weights.
    Weight decay applies to the model only; with --center-update paper the centers are left out
    of the optimiser (guarded_step moves them)."""
    seed_everything(args.seed)
    stats = channel_stats(data.train.images) if args.model == "lenet++" else (None, None)
    model = build_model(args.model, data.channels, len(data.classes), args.feat_dim, data.image_size, *stats).to(device)
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
        sparse_centers=args.center_update == "sgd",  # issue 25: SGD moves only the batch's centers (center_sgd_step)
    ).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    groups = [{"params": model.parameters(), "weight_decay": args.weight_decay}]
    if args.center_update == "paper":
        objective.centers.requires_grad_(False)
    else:
        groups.append({"params": objective.parameters(), "lr": args.lr_cent})
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum)
    dtype = AMP_DTYPES[args.amp]
    autocast: Callable[[], AbstractContextManager] = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
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
    )


def compile_and_wrap(model: nn.Module, compile_model: bool, device: torch.device, world: int) -> nn.Module:
    """The module the training step calls: DistributedDataParallel under torchrun, compiled on request."""
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if compile_model else model


def step_tensors(modules: list[torch.nn.Module], optimizer: torch.optim.Optimizer, skip: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Every tensor one training step changes: weights, buffers (BatchNorm statistics), optimizer state;
    without `skip` (centers that guard their own rows) and its optimizer state."""
    tensors = [t for m in modules for t in m.state_dict(keep_vars=True).values() if t is not skip]
    return tensors + [v for p, s in optimizer.state.items() if p is not skip for v in s.values() if torch.is_tensor(v)]


@torch.no_grad()
def undo_unless(finite: torch.Tensor, tensors: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    """t <- where(finite, t, saved): takes back a non-finite step without a host sync.

    Optimizer state that the step created (`tensors` beyond `saved`: SGD's momentum buffers on the
    first step) goes back to zero, which SGD treats exactly as a missing buffer (dampening 0).
    """
    for i, t in enumerate(tensors):
        torch.where(finite, t, saved[i] if i < len(saved) else t.new_zeros(()), out=t)


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Whether every element of every tensor is finite, as a bool tensor on their device (no host sync).

    By each tensor's L1 norm (one fused kernel on CUDA, as clip_grad_norm_ uses): an inf or NaN
    element makes it inf or NaN, and finite elements overflow it only when they average beyond
    float32's 3.4e38 / numel (about 1e33 for the largest layer), which is divergence too.
    """
    return torch.isfinite(torch.stack(torch._foreach_norm(tensors, 1))).all()


def clip_gradients(parameters: list[torch.Tensor], rows: ClassSums | None, max_norm: float) -> torch.Tensor:
    """Total L2 norm of the parameters' gradients and the centers' rows (losses.center_rows_grad, if
    any), all scaled by min(1, max_norm / norm) when max_norm > 0, on the device: no host sync."""
    grads = [p.grad for p in parameters if p.grad is not None] + ([rows.sums] if rows else [])
    norms = torch._foreach_norm(grads)
    if rows:  # the rows stand for a C x D gradient whose rows are counted once
        norms = [*norms[:-1], rows_grad_norm(rows)]
    norm = torch.linalg.vector_norm(torch.stack(norms))
    if max_norm:
        torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm


def guarded_step(trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Forward, loss (float32), backward, gradient clipping (if on), SGD update and the paper's center
    update (if on), taken back on the device unless the loss, the gradients and the updated
    parameters (weights and centers) are all finite.

    Every tensor the step can change (weights, BatchNorm buffers, momentum) is copied first and
    restored by torch.where(finite, new, old) after the update, so a bad step leaves no trace and
    the host never waits. Centers of cent and standalone (sparse SGD or the paper's update) are not
    copied: losses.py moves only their batch's rows, last and only where the step is finite. Under torchrun the loss sees the global batch (distributed.gather_batch).
    Returns (features, logits, labels, loss, terms, finite); labels are the global batch's.
    """
    model, objective, optimizer, scaler = trainer.net, trainer.objective, trainer.optimizer, trainer.scaler
    modules = [trainer.model, objective]
    # issue 25: centers moved by rows (the paper's update, sparse SGD) guard their own rows: no C x D copy.
    centers = objective.centers if trainer.center_alpha is not None or objective.sparse_centers else None
    if trainer.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    saved = [t.detach().clone() for t in step_tensors(modules, optimizer, centers)]
    with trainer.autocast():
        features, logits = model(x)
    features, logits, y = gather_batch(features, logits, y)
    loss, terms = objective(features, logits, y)
    optimizer.zero_grad(set_to_none=True)
    scaler_skipped = False
    if scaler is None:
        loss.backward()
        rows = center_rows_grad(objective.centers) if objective.sparse_centers else None  # issue 25
        norm = clip_gradients(trainer.parameters, rows, trainer.clip_grad_norm)
        finite = torch.isfinite(loss) & torch.isfinite(norm)
        optimizer.step()
    else:  # GradScaler skips steps with non-finite gradients itself (with a host sync of its own)
        scale = scaler.get_scale()
        scaler.scale(loss).backward()
        finite = torch.isfinite(loss)
        rows = center_rows_grad(objective.centers) if objective.sparse_centers else None  # issue 25
        if rows:
            rows = rows._replace(sums=rows.sums / scale)  # the scaler unscales only the optimiser's (dense) gradients
        if trainer.clip_grad_norm:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            clip_gradients(trainer.parameters, rows, trainer.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        # update() backs the scale off exactly when step() skipped: the centers then stay too. Such a
        # step is the scaler's routine search for a scale, not divergence, so it is not a bad step.
        scaler_skipped = scaler.get_scale() < scale
    # Finite gradients can still carry weights or centers past float32's range (a huge --lr).
    finite = finite & all_finite([p for p in trainer.parameters if p is not centers])
    # issue 25: the centers' rows move last, only if all else is finite; they report their own finiteness.
    if trainer.center_alpha is not None and not scaler_skipped:
        finite = finite & paper_center_update(centers, features.detach().float(), y, trainer.center_alpha, finite)
    elif rows and not scaler_skipped:
        finite = finite & optimizer_center_step(optimizer, centers, rows, finite)
    undo_unless(finite, step_tensors(modules, optimizer, centers), saved)
    return features, logits, y, loss, terms, finite


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
