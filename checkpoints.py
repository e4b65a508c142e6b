"""Run folders and checkpoints: atomic saves, safe loading (weights_only), configuration checks."""

import argparse
import contextlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from datasets import fingerprint
from training import EpochState, Run, add_momentum_buffers
from utils import atomic_write_bytes

# The settings a resumed run may change: where it runs and writes, what it draws or logs, how it
# loads; none changes its numbers (--epochs may only grow). Every other setting, a flag added later
# included, must equal the checkpoint's: its optimiser, scheduler, weights and momentum buffers (in
# the saved memory format) carry them, and args.json and summary.json would misreport a change.
FREE_KEYS = frozenset(
    "epochs device out name resume overwrite data_dir no_plots projection plot_every tensorboard "
    "eval_every workers threads max_bad_steps".split()
)
# The settings that checkpoints made before them lack, with the behaviour those runs had.
LEGACY_CONFIG = dict(weight_decay=0.0, clip_grad_norm=0.0, center_update="sgd", center_alpha=None)
LEGACY_CONFIG |= dict(train_classes=None, width=1)
# The run's parts with a state_dict, and what checkpoint() writes: a checkpoint without any of them cannot resume.
STATEFUL = ("model", "objective", "optimizer", "center_optimizer", "scheduler", "scaler")
RECORDS = ("history", "train_seconds", "samples", "bad_steps")  # the run's own, as they are
CHECKPOINT_KEYS = ("args", "epoch", "epoch_state", *STATEFUL, *RECORDS, "random")


def random_states(device: torch.device) -> dict[str, Any]:
    """torch's CPU generator and, on a CUDA run, the current CUDA device's (a CPU run never initialises CUDA);
    the data order and augmentations have generators of their own (utils.epoch_generator, EpochState.aug)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_random_states(states: dict[str, Any], device: torch.device) -> None:
    """Restore random_states(); a CUDA state applies only to a CUDA run, on any GPU count (checkpoints
    that saved a list of every GPU's state give the current device's, if they have it)."""
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if isinstance(cuda, list):
        cuda = cuda[device.index or 0] if len(cuda) > (device.index or 0) else None
    if device.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


class CheckpointError(Exception):
    """A checkpoint that cannot be used (corrupt, another configuration); one line, exit code 1."""


class RunFolderError(Exception):
    """A run folder that cannot be used now (another process holds it, --overwrite cannot empty it); one line, exit code 1."""


# in the run folder: whichever process holds its lock (filelock) owns the folder
LOCK_FILE = ".lock"
PID_FILE = ".lock.pid"  # beside it, the owner's pid (Windows cannot read a locked file's bytes)
LOCK_FILES = (LOCK_FILE, PID_FILE)
# when present
RUN_FILES = ("args.json", "metrics.csv", "checkpoint.pt", "summary.json", "train.gif", "test.gif")
RUN_FILES += ("train.png", "test.png")
# when present; a link there would send the run's files elsewhere
RUN_FOLDERS = ("frames", "frames/train", "frames/test", "tensorboard")
NAME_MAX = 255  # bytes in one file name on Linux's and macOS's file systems
# bytes in a run folder's path: Linux's PATH_MAX, less room for the files inside it
RUN_DIR_MAX = 4096 - 100


def checkpoint(run: Run, epoch: int, state: EpochState | None) -> dict:
    """Everything needed to continue bit for bit: weights, optimisers, scheduler, scaler, metrics, random
    states. `epoch` is the last finished epoch; `state` the unfinished next epoch's accumulators, if any."""
    parts = {key: getattr(run, key) for key in STATEFUL}
    return {
        "args": dict(vars(run.args)),
        "epoch": epoch,
        "epoch_state": state.as_dict() if state is not None else None,
        **{key: part.state_dict() if part is not None else None for key, part in parts.items()},
        **{key: getattr(run, key) for key in RECORDS},
        "random": random_states(run.device),
        "data": fingerprint(run.train, run.test),
    }


def load_checkpoint(path: Path, run: Run) -> dict:
    """Load a checkpoint to the CPU with weights_only (random states must be CPU tensors; load_state_dict copies to
    the run's device, which may be another), check that it fits this run and restore the run from it. Any damage,
    another setting (check_resume_settings) or other data is one CheckpointError line, before anything is written."""
    problem, other = None, "use --overwrite or another --name"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        problem = f"corrupt or unreadable checkpoint ({type(exc).__name__})"
    if not problem and (bad := damaged_parts(ckpt)):
        problem = f"incomplete or damaged checkpoint (missing or malformed: {', '.join(bad)})"
    if problem:
        raise CheckpointError(f"{path}: {problem}; delete it or start again with --overwrite")
    check_resume_settings(path, ckpt["args"], vars(run.args), ckpt["epoch"])
    data, folder = fingerprint(run.train, run.test), run.args.data_dir
    if ckpt.get("data", data) != data:  # checkpoints from before the fingerprint have none
        where = f"--data-dir {folder}" if folder else f"--dataset {run.args.dataset}"
        raise CheckpointError(
            f"{path}: the checkpoint was trained on other data ({ckpt['data']}; {where} holds {data}); resume on the data it was trained on, or {other}"
        )
    try:
        for key in (key for key in STATEFUL if getattr(run, key) is not None):
            getattr(run, key).load_state_dict(ckpt[key])
        set_random_states(ckpt["random"], run.device)
        add_momentum_buffers(run.optimizer)  # a checkpoint from before the first step has none
        if ckpt["epoch_state"] is not None:
            ckpt["epoch_state"] = epoch_state_on(ckpt["epoch_state"], run.device)
    except Exception as exc:  # a damaged state dict fails in many ways
        first_line = "".join(str(exc).splitlines()[:1])
        raise CheckpointError(
            f"{path}: checkpoint does not fit this run ({type(exc).__name__}: {first_line}); {other}"
        ) from None
    for key in RECORDS:
        setattr(run, key, ckpt[key])
    return ckpt


def epoch_state_on(saved: dict, device: torch.device) -> EpochState:
    """A checkpoint's unfinished-epoch accumulators on `device`; the augmentation generator's state stays a CPU tensor (set_state)."""
    moved = {k: v.to(device) if torch.is_tensor(v) and k != "aug" else v for k, v in saved.items()}
    moved |= {k: [t.to(device) for t in saved[k]] for k in ("frame_features", "frame_labels")}
    return EpochState(**moved)


def damaged_parts(ckpt: object) -> list[str]:
    """The parts of a loaded checkpoint that are missing or of the wrong type (checked before any is used)."""
    if not isinstance(ckpt, dict):
        return ["all of it (not a dictionary)"]
    if bad := [k for k in CHECKPOINT_KEYS if k not in ckpt]:
        return bad
    state = ckpt["epoch_state"]
    if isinstance(state, dict):
        needed = (f.name for f in fields(EpochState) if f.name != "skipped")  # older ones lack it
        bad = [f"epoch_state.{name}" for name in needed if name not in state]
    elif state is not None:
        bad = ["epoch_state"]
    kinds = {"args": dict, "epoch": int, "history": list}
    return bad + [k for k, kind in kinds.items() if not isinstance(ckpt[k], kind)]


def check_resume_settings(path: Path, saved: dict, args: dict, trained: int) -> None:
    """Refuse to resume with any setting but FREE_KEYS other than the checkpoint's (CheckpointError, one line; an
    unrecorded setting LEGACY_CONFIG does not know is other), or with fewer --epochs than it trained (SystemExit 2)."""
    for key in (key for key in args if key not in FREE_KEYS):  # in the order of --help
        value = saved.get(key, LEGACY_CONFIG.get(key, saved))  # saved itself: not recorded
        if value != args[key]:
            was = "no record of it" if value is saved else as_flag(key, value)
            again = f"resume with {was}, or " if value is not saved else ""
            raise CheckpointError(
                f"{path}: checkpoint is of another configuration ({was}, this run {as_flag(key, args[key])}); {again}start again with --overwrite or another --name"
            )
    if args["epochs"] < trained:
        message = f"--epochs {args['epochs']}: the checkpoint {path} has already trained {trained} epochs; "
        raise SystemExit(usage_error(message + f"resume with --epochs {trained} or more"))


def as_flag(key: str, value: object) -> str:
    """A setting as the command line gives it: --lr 0.01, --no-channels-last, no --inter-margin."""
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    return f"no {flag}" if value is None else f"{flag} {value}"


def out_problem(out: str) -> str | None:
    """Why --out cannot hold run folders, or None; read-only, so that a refused command changes nothing."""
    if "\0" in out:
        return "--out must not contain a NUL character"
    if not out.strip():
        return "--out must not be empty (it would put the run folder in the current folder; give --out . for that)"
    # "runs " and "runs" look alike in every listing: a run folder no one finds
    if out != out.strip():
        return f"--out {out!r} starts or ends with whitespace; give it without"
    try:
        path = Path(out).resolve()
    # Python < 3.13: a loop of symbolic links (3.13 leaves it to mkdir's one line)
    except RuntimeError:
        return f"--out {out}: a loop of symbolic links; choose another --out"
    if path.parts[1:2] in (("proc",), ("sys",)):
        return f"--out {out} lies under /{path.parts[1]}, a kernel file system; choose a folder of your own"
    if long := next((part for part in path.parts if len(os.fsencode(part)) > NAME_MAX), None):
        return f"--out: the folder name {long[:40]}... is {len(os.fsencode(long))} bytes long, more than the {NAME_MAX} a file system allows"
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
    return isinstance(saved, dict) and {"loss", "dataset", "feat_dim", "name", "out"} <= set(saved)


def check_run_dir(args: argparse.Namespace) -> tuple[Path, bool]:
    """The run folder and whether to resume, or SystemExit(2) for one the command must not touch: a file, a link, a folder
    main.py did not make, a finished run (without --overwrite). Only reads: every torchrun process checks before rank 0 writes."""
    run_dir = Path(args.out) / args.name
    if problem := run_dir_problem(run_dir, args.overwrite):
        raise SystemExit(usage_error(problem))
    has_checkpoint = (run_dir / "checkpoint.pt").is_file()
    if args.resume and not has_checkpoint:
        raise SystemExit(usage_error(f"{run_dir} holds no checkpoint.pt to resume from"))
    return run_dir, has_checkpoint and not args.overwrite


def run_dir_problem(run_dir: Path, overwrite: bool) -> str | None:
    """Why check_run_dir refuses `run_dir`, or None."""
    other = "choose another --name or --out"
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        return f"{run_dir} exists and is not a folder; {other}"
    if run_dir.is_dir() and not made_by_main(run_dir):
        if any(p.name not in LOCK_FILES for p in run_dir.iterdir()):
            return f"{run_dir} is not a run folder of main.py (it has no args.json of ours), so it is left alone; {other}"
    if overwrite:
        return None
    # found now, not when the first checkpoint cannot replace it after an epoch
    again = "remove it, or use --overwrite to start the run again"
    for path in (run_dir / name for name in RUN_FILES):
        if path.exists() and not path.is_file():
            return f"{path} is not a regular file; {again}"
    for path in (run_dir / name for name in RUN_FOLDERS):
        if path.is_symlink() or path.exists() and not path.is_dir():
            return f"{path} is a link or not a folder; {again}"
    if (run_dir / "summary.json").is_file():
        return (
            f"{run_dir} holds a finished run; use --overwrite to replace it or --name for another"
        )
    return None


def make_run_dir(run_dir: Path, overwrite: bool) -> FileLock:
    """Rank 0, after check_run_dir: create the folder, take its lock (lock_run_dir, held to the end), empty it on --overwrite."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        problem = f"cannot create the run folder {run_dir} ({exc.strerror}); choose another --out"
        raise SystemExit(usage_error(problem)) from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        problem = f"the run folder {run_dir} is not writable; choose another --out or --name"
        raise SystemExit(usage_error(problem))
    return lock_run_dir(run_dir, empty_run_dir if overwrite else None)


def lock_run_dir(run_dir: Path, then: Callable[[Path], None] | None = None) -> FileLock:
    """Take the run folder for this process (filelock on run_dir/.lock: flock, or msvcrt.locking on Windows, released
    however the process ends: no stale lock), write its pid in .lock.pid, call then(run_dir); or RunFolderError naming
    the pid there. A .lock that is a link is refused: filelock 3 opens it with O_TRUNC, through a link."""
    path, other = run_dir / LOCK_FILE, "choose another --name or --out"
    if path.is_symlink():
        raise RunFolderError(f"cannot open the lock file {path} (it is a link); {other}")
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        holder = ""
        with contextlib.suppress(OSError):
            holder = (run_dir / PID_FILE).read_text(errors="replace").strip()
        who = f"process {holder}" if holder.isdigit() else "another process"
        raise RunFolderError(f"{run_dir} is in use by {who}, a run still going; {other}") from None
    except OSError as exc:
        raise RunFolderError(
            f"cannot open the lock file {path} ({exc.strerror}); {other}"
        ) from None
    try:
        atomic_write_bytes(run_dir / PID_FILE, f"{os.getpid()}\n".encode())
        if then is not None:
            then(run_dir)
    except BaseException:
        lock.release()
        raise
    return lock


def empty_run_dir(run_dir: Path) -> None:
    """--overwrite, under the lock: delete all in a folder of main.py's but the lock files, summary.json first, so that
    a deletion that fails half-way never leaves a folder that looks finished (another's empty folder is kept as it is)."""
    if not made_by_main(run_dir):
        return
    paths = (p for p in run_dir.iterdir() if p.name not in LOCK_FILES)
    for path in sorted(paths, key=lambda p: p.name != "summary.json"):
        try:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        except OSError as exc:
            raise RunFolderError(
                f"--overwrite cannot delete {exc.filename or path} ({exc.strerror}); the old run is partly deleted (no summary.json): fix the permissions and run again, or choose another --name"
            ) from None


def usage_error(message: str) -> int:
    print(f"main.py: error: {message}", file=sys.stderr)
    return 2
