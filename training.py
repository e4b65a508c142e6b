"""The training step main.py and bench.py share: the model, objective and optimiser a run trains,
and one SGD step guarded against non-finite losses and gradients without a host sync."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn as nn

from datasets import Dataset, channel_stats
from losses import CENTER_ACC_LOSSES, Objective, paper_center_update
from models import build_model
from utils import gather_batch, seed_everything, step_tensors, undo_unless

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# What --weight-decay and --clip-grad-norm (0: off) default to per model. The study's ResNet trains
# without either; LeNet++, with no batch normalisation, takes the center-loss paper's weight decay and
# clipped gradients, which bound its first steps (README, Command line).
MODEL_RECIPES = {
    "resnet": {"weight_decay": 0.0, "clip_grad_norm": 0.0},
    "lenet++": {"weight_decay": 5e-4, "clip_grad_norm": 10.0},
}


def build_trainer(args: argparse.Namespace, data: Dataset, device: torch.device, world: int = 1) -> dict:
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
        args.loss, len(data.classes), args.feat_dim, args.weight_cent, args.weight_intra, args.weight_inter, args.inter_margin, args.alpha
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
    return {
        "model": model,
        "net": compile_and_wrap(model, args.compile, device, world),
        "objective": objective,
        "optimizer": optimizer,
        "parameters": [p for group in optimizer.param_groups for p in group["params"]],
        "scaler": torch.amp.GradScaler(device.type) if args.amp == "fp16" else None,
        "autocast": autocast,
        "channels_last": args.channels_last,
        "clip_grad_norm": args.clip_grad_norm,
        "center_alpha": args.center_alpha,  # None unless --center-update paper
    }


def compile_and_wrap(model: nn.Module, compile_model: bool, device: torch.device, world: int) -> nn.Module:
    """The module the training step calls: DistributedDataParallel under torchrun, compiled on request."""
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if compile_model else model


def guarded_step(trainer: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Forward, loss (float32), backward, gradient clipping (if on), SGD update and the paper's
    center update (if on), taken back on the device if not finite.

    Every tensor the step can change (weights, centers, BatchNorm buffers, momentum) is copied first
    and restored by torch.where(finite, new, old) after the update, so a bad step leaves no trace and
    the host never waits. Under torchrun the loss sees the global batch (utils.gather_batch).
    Returns (features, logits, labels, loss, terms, finite); labels are the global batch's.
    """
    model, objective, optimizer, scaler = trainer["net"], trainer["objective"], trainer["optimizer"], trainer["scaler"]
    modules = [trainer["model"], objective]
    if trainer["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    saved = [t.detach().clone() for t in step_tensors(modules, optimizer)]
    with trainer["autocast"]():
        features, logits = model(x)
    features, logits, y = gather_batch(features, logits, y)
    loss, terms = objective(features, logits, y)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        grads = [p.grad for p in trainer["parameters"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        finite = torch.isfinite(loss) & torch.isfinite(norm)
        if trainer["clip_grad_norm"]:  # scales by min(1, max_norm / norm) on the device: no sync
            torch.nn.utils.clip_grads_with_norm_(trainer["parameters"], trainer["clip_grad_norm"], norm, foreach=True)
        optimizer.step()
    else:  # GradScaler skips steps with non-finite gradients itself (with a host sync of its own)
        scaler.scale(loss).backward()
        finite = torch.isfinite(loss)
        if trainer["clip_grad_norm"]:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(trainer["parameters"], trainer["clip_grad_norm"], foreach=True)
        scaler.step(optimizer)
        scaler.update()
    if trainer["center_alpha"] is not None:  # before undo_unless: a bad step takes it back too
        paper_center_update(objective.centers, features.detach().float(), y, trainer["center_alpha"])
    undo_unless(finite, step_tensors(modules, optimizer), saved)
    return features, logits, y, loss, terms, finite
