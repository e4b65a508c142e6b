"""Run folders and checkpoints: atomic saves, safe loading (weights_only), configuration checks."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from utils import random_states, set_random_states

# Settings that define a run: a checkpoint made with other values cannot be resumed.
CONFIG_KEYS = (
    "loss",
    "dataset",
    "model",
    "feat_dim",
    "batch_size",
    "train_samples",
    "weight_cent",
    "weight_intra",
    "weight_inter",
    "inter_margin",
    "alpha",
    "val_fraction",
    "seed",
    "pipeline",
    "weight_decay",
    "clip_grad_norm",
    "center_update",
    "center_alpha",
)
# The keys above that checkpoints made before them lack, with the behaviour those runs had.
LEGACY_CONFIG = {"weight_decay": 0.0, "clip_grad_norm": 0.0, "center_update": "sgd", "center_alpha": None}


class CheckpointError(Exception):
    """A checkpoint that cannot be used (corrupt, another configuration); one line, exit code 1."""


def checkpoint(run: dict, epoch: int, state: dict | None) -> dict:
    """Everything needed to continue bit for bit: weights, optimiser, scheduler, metrics, random states.
    `epoch` is the last finished epoch; `state` the unfinished next epoch's accumulators, if any."""
    return {
        "args": {k: v for k, v in vars(run["args"]).items()},
        "epoch": epoch,
        "epoch_state": state,
        "model": run["model"].state_dict(),
        "objective": run["objective"].state_dict(),
        "optimizer": run["optimizer"].state_dict(),
        "scheduler": run["scheduler"].state_dict(),
        "scaler": run["scaler"].state_dict() if run["scaler"] is not None else None,
        "history": run["history"],
        "train_seconds": run["train_seconds"],
        "samples": run["samples"],
        "bad_steps": run["bad_steps"],
        "random": random_states(),
    }


def load_checkpoint(path: Path, run: dict) -> dict:
    """Load a checkpoint safely (weights_only: it cannot run code) and check it fits this run."""
    try:
        ckpt = torch.load(path, map_location=run["device"], weights_only=True)
        saved = ckpt["args"]
    except Exception as exc:
        raise CheckpointError(
            f"{path}: corrupt or unreadable checkpoint ({type(exc).__name__}); delete it or start again with --overwrite"
        ) from None
    args = vars(run["args"])
    for key in CONFIG_KEYS:
        value = saved.get(key, LEGACY_CONFIG.get(key))
        if value != args[key]:
            raise CheckpointError(
                f"{path}: checkpoint is of another configuration ({key} {value!r}, this run {args[key]!r}); use --overwrite or another --name"
            )
    try:
        run["model"].load_state_dict(ckpt["model"])
        run["objective"].load_state_dict(ckpt["objective"])
        run["optimizer"].load_state_dict(ckpt["optimizer"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: checkpoint does not fit this model ({str(exc).splitlines()[0]}); use --overwrite or another --name"
        ) from None
    run["scheduler"].load_state_dict(ckpt["scheduler"])
    if run["scaler"] is not None and ckpt["scaler"]:
        run["scaler"].load_state_dict(ckpt["scaler"])
    for key in ("history", "train_seconds", "samples", "bad_steps"):
        run[key] = ckpt[key]
    set_random_states(ckpt["random"])
    return ckpt


def prepare_run_dir(args: argparse.Namespace, rank: int = 0) -> tuple[Path, bool]:
    """Create the run folder (rank 0 only); returns (folder, resume). Refuses to touch a finished run unless --overwrite."""
    run_dir = Path(args.out) / args.name
    has_checkpoint = (run_dir / "checkpoint.pt").is_file()
    if args.overwrite and run_dir.exists():
        if rank == 0:
            shutil.rmtree(run_dir)
    elif (run_dir / "summary.json").is_file():
        raise SystemExit(usage_error(f"{run_dir} holds a finished run; use --overwrite to replace it or --name for another"))
    elif args.resume and not has_checkpoint:
        raise SystemExit(usage_error(f"--resume: {run_dir} holds no checkpoint.pt to resume from"))
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, has_checkpoint and not args.overwrite


def usage_error(message: str) -> int:
    print(f"main.py: error: {message}", file=sys.stderr)
    return 2
