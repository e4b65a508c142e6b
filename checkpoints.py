"""Run folders and checkpoints: atomic saves, safe loading (weights_only), configuration checks."""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import random
import shutil
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training import EpochState, Run, add_momentum_buffers

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
    "train_classes",
    "width",
)
# The keys above that checkpoints made before them lack, with the behaviour those runs had.
LEGACY_CONFIG = {
    "weight_decay": 0.0,
    "clip_grad_norm": 0.0,
    "center_update": "sgd",
    "center_alpha": None,
    "train_classes": None,
    "width": 1,
}
# Settings the checkpoint's optimiser and scheduler carry, and --amp (a run half fp32, half bf16 would be
# mislabelled): resuming with other values is refused (--epochs may grow, --device may change).
RESUME_KEYS = ("lr", "lr_cent", "momentum", "factor", "patience", "threshold", "amp")
# What checkpoint() writes: a checkpoint without any of them cannot resume.
CHECKPOINT_KEYS = (
    "args",
    "epoch",
    "epoch_state",
    "model",
    "objective",
    "optimizer",
    "scheduler",
    "scaler",
    "history",
    "train_seconds",
    "samples",
    "bad_steps",
    "random",
)


def random_states() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) random states, in types that weights_only loading accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_random_states(states: dict[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class CheckpointError(Exception):
    """A checkpoint that cannot be used (corrupt, another configuration); one line, exit code 1."""


class RunFolderError(Exception):
    """A run folder that cannot be used now (another process holds it, --overwrite cannot empty it); one line, exit code 1."""


LOCK_FILE = ".lock"  # in the run folder: whichever process holds its flock owns the folder
RUN_FILES = ("args.json", "metrics.csv", "checkpoint.pt", "summary.json", "train.gif", "test.gif", "train.png", "test.png")  # when present
RUN_FOLDERS = ("frames", "frames/train", "frames/test", "tensorboard")  # when present; a link there would send the run's files elsewhere
NAME_MAX = 255  # bytes in one file name on Linux's and macOS's file systems
RUN_DIR_MAX = 4096 - 100  # bytes in a run folder's path: Linux's PATH_MAX, less room for the files inside it


def checkpoint(run: Run, epoch: int, state: EpochState | None) -> dict:
    """Everything needed to continue bit for bit: weights, optimiser, scheduler, metrics, random states.
    `epoch` is the last finished epoch; `state` the unfinished next epoch's accumulators, if any."""
    return {
        "args": {k: v for k, v in vars(run.args).items()},
        "epoch": epoch,
        "epoch_state": state.as_dict() if state is not None else None,
        "model": run.model.state_dict(),
        "objective": run.objective.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "history": run.history,
        "train_seconds": run.train_seconds,
        "samples": run.samples,
        "bad_steps": run.bad_steps,
        "random": random_states(),
    }


def load_checkpoint(path: Path, run: Run) -> dict:
    """Load a checkpoint safely (weights_only: it cannot run code), check it fits this run and restore
    the run from it. Any damage is one
    CheckpointError line; resuming with other optimisation settings is refused (SystemExit 2).

    It is loaded to the CPU, whatever device saved it: random states must be CPU tensors, and
    load_state_dict copies weights and optimizer state to the device of the run's own tensors. Only
    the unfinished epoch's accumulators move to run.device, so a run may resume on another device
    (args.json records the new one; main.train_epoch re-seeds the augmentations of an epoch cut short
    on another kind of device)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: corrupt or unreadable checkpoint ({type(exc).__name__}); delete it or start again with --overwrite"
        ) from None
    bad = damaged_parts(ckpt)
    if bad:
        raise CheckpointError(
            f"{path}: incomplete or damaged checkpoint (missing or malformed: {', '.join(bad)}); delete it or start again with --overwrite"
        )
    saved, args = ckpt["args"], vars(run.args)
    for key in CONFIG_KEYS:
        value = saved.get(key, LEGACY_CONFIG.get(key))
        if value != args[key]:
            raise CheckpointError(
                f"{path}: checkpoint is of another configuration ({key} {value!r}, this run {args[key]!r}); use --overwrite or another --name"
            )
    check_resume_settings(path, saved, args, ckpt["epoch"])
    try:
        run.model.load_state_dict(ckpt["model"])
        run.objective.load_state_dict(ckpt["objective"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        if run.scaler is not None and ckpt["scaler"]:
            run.scaler.load_state_dict(ckpt["scaler"])
        set_random_states(ckpt["random"])
        add_momentum_buffers(run.optimizer)  # a checkpoint from before the first step has none
        if ckpt["epoch_state"] is not None:
            ckpt["epoch_state"] = epoch_state_on(ckpt["epoch_state"], run.device)
    except Exception as exc:  # a damaged state dict fails in many ways (RuntimeError, KeyError, TypeError, ...)
        raise CheckpointError(
            f"{path}: checkpoint does not fit this run ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "use --overwrite or another --name"
        ) from None
    for key in ("history", "train_seconds", "samples", "bad_steps"):
        setattr(run, key, ckpt[key])
    return ckpt


def epoch_state_on(saved: dict, device: torch.device) -> EpochState:
    """A checkpoint's unfinished-epoch accumulators, moved to `device`; the augmentation generator's
    state stays a CPU tensor, the only kind Generator.set_state takes (main.train_epoch)."""
    moved = {k: v.to(device) if torch.is_tensor(v) and k != "aug" else v for k, v in saved.items()}
    moved["frame_features"] = [t.to(device) for t in saved["frame_features"]]
    moved["frame_labels"] = [t.to(device) for t in saved["frame_labels"]]
    return EpochState(**moved)


def damaged_parts(ckpt: object) -> list[str]:
    """The parts of a loaded checkpoint that are missing or of the wrong type (checked before any is used)."""
    if not isinstance(ckpt, dict):
        return ["all of it (not a dictionary)"]
    bad = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if bad:
        return bad
    state = ckpt["epoch_state"]
    if state is not None:
        bad = [f"epoch_state.{f.name}" for f in fields(EpochState) if f.name not in state] if isinstance(state, dict) else ["epoch_state"]
    return bad + [k for k, kind in (("args", dict), ("epoch", int), ("history", list)) if not isinstance(ckpt[k], kind)]


def check_resume_settings(path: Path, saved: dict, args: dict, trained: int) -> None:
    """Refuse (SystemExit 2) to resume with optimisation settings the checkpoint overrides: its
    optimiser and scheduler carry their own, which args.json and summary.json would misreport."""
    for key in RESUME_KEYS:
        if saved.get(key) != args[key]:
            flag = "--" + key.replace("_", "-")
            raise SystemExit(
                usage_error(
                    f"{flag} {args[key]} differs from the {saved.get(key)} of the checkpoint {path}, which a resumed run keeps; "
                    f"resume with {flag} {saved.get(key)}, or start again with --overwrite or another --name"
                )
            )
    if args["epochs"] < trained:
        raise SystemExit(
            usage_error(
                f"--epochs {args['epochs']}: the checkpoint {path} has already trained {trained} epochs; resume with --epochs {trained} or more"
            )
        )


def out_problem(out: str) -> str | None:
    """Why --out cannot hold run folders, or None; read-only, so that a refused command changes nothing."""
    if "\0" in out:
        return "--out must not contain a NUL character"
    if not out.strip():
        return "--out must not be empty (it would put the run folder in the current folder; give --out . for that)"
    path = Path(out).resolve()
    if path.parts[1:2] in (("proc",), ("sys",)):
        return f"--out {out} lies under /{path.parts[1]}, a kernel file system; choose a folder of your own"
    long = next((part for part in path.parts if len(os.fsencode(part)) > NAME_MAX), None)
    if long is not None:
        return (
            f"--out: the folder name {long[:40]}... is {len(os.fsencode(long))} bytes long, more than the {NAME_MAX} a file system allows"
        )
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
    except OSError as exc:  # a path past PATH_MAX, a folder that cannot be searched
        return f"--out {out[:80]}: {exc.strerror}; choose another --out"
    if not existing.is_dir():
        return f"--out {out}: {existing} is a file, not a folder; choose another --out"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"--out {out}: {existing} is not writable; choose another --out"
    return None


def made_by_main(run_dir: Path) -> bool:
    """Whether `run_dir` holds main.py's args.json, the mark of a run folder that --overwrite may delete."""
    try:
        saved = json.loads((run_dir / "args.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(saved, dict) and {"loss", "dataset", "feat_dim", "name", "out"} <= saved.keys()


def check_run_dir(args: argparse.Namespace) -> tuple[Path, bool]:
    """The run folder and whether to resume, or SystemExit(2) for one the command must not touch: a file, a link, a folder
    main.py did not make, a finished run (without --overwrite). Only reads: every torchrun process checks before rank 0 writes."""
    run_dir = Path(args.out) / args.name
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise SystemExit(usage_error(f"{run_dir} exists and is not a folder; choose another --name or --out"))
    if run_dir.is_dir() and any(p.name != LOCK_FILE for p in run_dir.iterdir()) and not made_by_main(run_dir):
        raise SystemExit(
            usage_error(
                f"{run_dir} is not a run folder of main.py (it has no args.json of ours), so it is left alone; choose another --name or --out"
            )
        )
    odd = [f"{p} is not a regular file" for p in (run_dir / n for n in RUN_FILES) if p.exists() and not p.is_file()]
    odd += [f"{p} is a link or not a folder" for p in (run_dir / n for n in RUN_FOLDERS) if p.is_symlink() or p.exists() and not p.is_dir()]
    if odd and not args.overwrite:  # found now, not when the first checkpoint cannot replace it after an epoch
        raise SystemExit(usage_error(f"{odd[0]}; remove it, or use --overwrite to start the run again"))
    has_checkpoint = (run_dir / "checkpoint.pt").is_file()
    if not args.overwrite and (run_dir / "summary.json").is_file():
        raise SystemExit(usage_error(f"{run_dir} holds a finished run; use --overwrite to replace it or --name for another"))
    if args.resume and not has_checkpoint:
        raise SystemExit(usage_error(f"--resume: {run_dir} holds no checkpoint.pt to resume from"))
    return run_dir, has_checkpoint and not args.overwrite


def make_run_dir(run_dir: Path, overwrite: bool) -> int:
    """Rank 0, after check_run_dir: create the folder, lock it (lock_run_dir) and, on --overwrite, empty it of the old run (only
    a folder of main.py's: an empty folder of someone else's is reused as it is). Returns the lock's descriptor, held to the end."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SystemExit(usage_error(f"cannot create the run folder {run_dir} ({exc.strerror}); choose another --out")) from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise SystemExit(usage_error(f"the run folder {run_dir} is not writable; choose another --out or --name"))
    try:
        lock = lock_run_dir(run_dir)
    except OSError as exc:  # writing the pid into the lock file, on a full disk
        raise RunFolderError(f"cannot write the lock file in {run_dir} ({exc.strerror}); free space or choose another --out") from None
    try:
        if overwrite and made_by_main(run_dir):
            empty_run_dir(run_dir)
    except BaseException:
        os.close(lock)
        raise
    return lock


def lock_run_dir(run_dir: Path) -> int:
    """Take the run folder for this process, or RunFolderError naming the process that holds it.

    An exclusive fcntl.flock on run_dir/.lock, which holds the owner's pid for that message. The
    kernel releases a flock when its process ends in any way, SIGKILL included, so a lock file left
    behind never blocks the next run, and no stale-pid guessing is needed. The file itself stays
    (deleting it would let a process that opened it just before lock a file no one else sees)."""
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # a planted link must not make us truncate its target
    except OSError as exc:
        raise RunFolderError(f"cannot open the lock file {path} ({exc.strerror}); choose another --name or --out") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise RunFolderError(f"cannot lock {path} ({exc.strerror}); choose another --out") from None
        who = f"process {holder}" if holder.isdigit() else "another process"
        raise RunFolderError(
            f"{run_dir} is in use by {who}, a run still going; wait for it to end, stop it, or choose another --name"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def empty_run_dir(run_dir: Path) -> None:
    """--overwrite, under the lock: delete everything in the folder but the lock file, summary.json
    first, so that a deletion that fails half-way never leaves a folder that looks finished."""
    entries = sorted((p for p in run_dir.iterdir() if p.name != LOCK_FILE), key=lambda p: p.name != "summary.json")
    for path in entries:
        try:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        except OSError as exc:
            raise RunFolderError(
                f"--overwrite cannot delete {exc.filename or path} ({exc.strerror}); the old run in {run_dir} is partly deleted "
                "(no summary.json): fix the permissions and run again, or choose another --name"
            ) from None


def usage_error(message: str) -> int:
    print(f"main.py: error: {message}", file=sys.stderr)
    return 2
