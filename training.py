"""The training step main.py and bench.py share: the model, objective and optimiser a run trains,
and one SGD step guarded against non-finite losses, gradients and weights without a host sync."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn as nn

from datasets import Dataset
from losses import CENTER_ACC_LOSSES, Objective
from models import build_model
from utils import gather_batch, seed_everything, step_tensors, undo_unless

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_trainer(args: argparse.Namespace, data: Dataset, device: torch.device, world: int = 1) -> dict:
    """Model, objective, SGD optimiser, GradScaler (fp16 only) and autocast from main.py's settings,
    built in a fixed order after seeding, so that the same --seed gives the same initial weights."""
    seed_everything(args.seed)
    model = build_model(args.model, data.channels, len(data.classes), args.feat_dim, data.image_size).to(device)
    if args.loss in CENTER_ACC_LOSSES:  # logits unused: no gradient, and DDP must not wait for one
        model.classifier.requires_grad_(False)
    if world > 1 and device.type == "cuda":  # batch statistics over the global batch (SyncBatchNorm needs a GPU)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    objective = Objective(
        args.loss, len(data.classes), args.feat_dim, args.weight_cent, args.weight_intra, args.weight_inter, args.inter_margin, args.alpha
    ).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        [{"params": model.parameters()}, {"params": objective.parameters(), "lr": args.lr_cent}], lr=args.lr, momentum=args.momentum
    )
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
    }


def compile_and_wrap(model: nn.Module, compile_model: bool, device: torch.device, world: int) -> nn.Module:
    """The module the training step calls: DistributedDataParallel under torchrun, compiled on request."""
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if compile_model else model


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Whether every element of every tensor is finite, as a bool tensor on their device (no host sync).

    By each tensor's L1 norm (one fused kernel on CUDA, as clip_grad_norm_ uses): an inf or NaN
    element makes it inf or NaN, and finite elements overflow it only when they average beyond
    float32's 3.4e38 / numel (about 1e33 for the largest layer), which is divergence too.
    """
    return torch.isfinite(torch.stack(torch._foreach_norm(tensors, 1))).all()


def guarded_step(trainer: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Forward, loss (float32), backward and SGD update, taken back on the device unless the loss,
    the gradients and the updated parameters (weights and centers) are all finite.

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
        finite = torch.isfinite(loss) & all_finite([p.grad for p in trainer["parameters"] if p.grad is not None])
        optimizer.step()
    else:  # GradScaler skips steps with non-finite gradients itself (with a host sync of its own)
        scaler.scale(loss).backward()
        finite = torch.isfinite(loss)
        scaler.step(optimizer)
        scaler.update()
    # Finite gradients can still carry weights or centers past float32's range (a huge --lr).
    finite = finite & all_finite(trainer["parameters"])
    undo_unless(finite, step_tensors(modules, optimizer), saved)
    return features, logits, y, loss, terms, finite
