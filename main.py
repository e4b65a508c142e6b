"""Train a CNN with softmax (xent), softmax + center loss (cent) or the standalone center loss.

    python main.py                                                   # digits, offline, a few minutes
    python main.py --loss standalone --dataset mnist --data-dir ../shared/data --feat-dim 2

Each run writes runs/<loss>-<dataset>-feat=<d>/: args.json, metrics.csv (one row per epoch),
checkpoint.pt (every epoch; an unfinished run resumes from it), frames/ (2-D features) and, once
finished, summary.json. Exit codes: 0 done, 1 data/checkpoint error or divergence, 2 bad arguments,
130/143/129 interrupted by SIGINT/SIGTERM/SIGHUP after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time

if sys.version_info < (3, 10):  # noqa: UP036 (the one line an older Python gets, not a traceback)
    sys.exit(f"error: this code needs Python 3.10 or newer, not {sys.version.split()[0]}")
# Ctrl-C, a batch system's stop, a closed terminal (Windows has no SIGHUP): each saves a checkpoint.
STOP_SIGNALS = tuple(
    getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)
)
STARTUP_INTERRUPT = "interrupted before training started; no new checkpoint was saved, run the same command to start again"


def interrupted_at_startup(signum: int, frame: object) -> None:
    """SIGINT or SIGTERM before the training loop installs its handlers: one line, exit 128 + signum, at once (nothing to
    save yet). No exception: one raised into start-up's lazy imports can end in their tracebacks or a C++ terminate (rc 134)."""
    os.write(2, (STARTUP_INTERRUPT + "\n").encode())
    os._exit(128 + signum)


def interrupt(signum: int, frame: object) -> None:
    """SIGINT or SIGTERM after the training loop: a KeyboardInterrupt carrying the signal, for train() to report."""
    raise KeyboardInterrupt(signum)


# A signal while torch and the rest import (seconds), load data, build the model: one line.
if __name__ == "__main__":
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, interrupted_at_startup)

import torch
import torch.distributed as dist
from filelock import FileLock

import datasets
import visualize
from batches import full_batches
from checkpoints import (
    CheckpointError,
    RunFolderError,
    check_run_dir,
    checkpoint,
    load_checkpoint,
    make_run_dir,
    usage_error,
)
from config import parse_args
from datasets import DataError, Dataset, ImageData, load_dataset
from distributed import (
    DistributedError,
    close_distributed,
    from_rank0,
    init_distributed,
    rank0_first,
)
from epoch import TrainingError, check_moved, log, stop_agreed, train_epoch
from evaluation import COLUMNS, embed, epoch_row, run_summary
from models import MIN_SIDE
from training import EpochState, Run, build_trainer, cuda_backends, make_scheduler
from utils import (
    WriteError,
    atomic_torch_save,
    epoch_generator,
    resolve_device,
    write_csv,
    write_json,
)

FRAME_POINTS = 5000  # points per 2-D frame: enough to see the clusters, under a second to draw
PROJECTION_POINTS = 2000
EMBEDDING_POINTS = 2000  # TensorBoard projector: test features with their thumbnails


def train(args: argparse.Namespace, rank: int, world: int) -> int:
    """Build the run, resume it if a checkpoint is there, train the epochs, finish (rank 0), in its folder locked by rank 0."""
    run, data, resuming, lock = build(args, rank, world)
    try:
        start_epoch, state = resume(run, data, resuming)
        stopped = loop(run, data, start_epoch, state)
        if stopped is not None:
            return stopped
        if rank == 0:
            previous = {s: signal.signal(s, interrupt) for s in STOP_SIGNALS}
            try:
                finish(run, data)
            except KeyboardInterrupt as exc:  # pictures and summary are redone from the checkpoint
                drawing = "interrupted while drawing the final pictures and writing summary.json"
                print(
                    f"{drawing}; the checkpoint of epoch {args.epochs} is saved, run the same command to finish the run",
                    file=sys.stderr,
                )
                return 128 + (exc.args[0] if exc.args else signal.SIGINT)
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)
        return 0
    finally:
        if lock is not None:
            lock.release()


def build(
    args: argparse.Namespace, rank: int, world: int
) -> tuple[Run, Dataset, bool, FileLock | None]:
    """The data, the run folder (locked by rank 0: its lock, held until train() ends) and
    the run (model, objective, optimiser, scheduler); whether to resume."""
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cuda_backends(device)
    data = rank0_first(load_dataset, args.dataset, args.data_dir or "data")  # downloads if need be
    unseen = None
    if args.train_classes is not None:
        try:
            data, unseen = datasets.open_set_split(
                data, datasets.parse_class_list(args.train_classes, data.classes)
            )
        except ValueError as exc:
            raise SystemExit(usage_error(str(exc))) from None
    if args.train_samples is not None:
        data.train = ImageData(
            data.train.images[: args.train_samples], data.train.labels[: args.train_samples]
        )
    present = data.train.labels.unique()
    # also after --train-samples: the losses compare classes, one class learns nothing
    if len(present) < 2:
        first = (
            f" in its first --train-samples {args.train_samples}"
            if args.train_samples is not None
            else ""
        )
        only = data.classes[int(present[0])]
        raise DataError(
            f"{data.source}: the train set has only the class {only!r}{first}; a classifier needs at least two"
        )
    val = None
    if args.val_fraction > 0:
        data.train, val = datasets.split_validation(data.train, args.val_fraction, args.seed)
    if len(data.train) < args.batch_size:
        few = f"the train set has {len(data.train)} samples, fewer than one batch of --batch-size {args.batch_size} (the last partial"
        raise SystemExit(
            usage_error(
                few
                + " batch is dropped, as in the study); use a smaller --batch-size or more --train-samples"
            )
        )
    side, need = data.image_size, MIN_SIDE[args.model]
    if side < need:
        small = f"--model {args.model} needs images of at least {need}x{need} pixels and {args.data_dir or args.dataset} has {side}x{side}"
        raise SystemExit(
            usage_error(
                small
                + "; use larger images"
                + (" or --model resnet" if args.model != "resnet" else "")
            )
        )
    run_dir, resuming = check_run_dir(args)
    if world > 1:  # every process has checked before rank 0 deletes or creates anything
        dist.barrier()
    lock = None
    if rank == 0:
        # held until train() ends: no other run writes here
        lock = make_run_dir(run_dir, args.overwrite)
        # Again under the lock: the run that held the folder may have finished or saved a checkpoint since.
        run_dir, resuming = check_run_dir(args)
    if world > 1:  # the other ranks write nothing in the folder, and only after rank 0 holds it
        dist.barrier()
    on_device = args.pipeline == "fast"  # the fast path keeps the data on the training device
    run = Run(
        **vars(build_trainer(args, data, device, world)),
        args=args,
        dir=run_dir,
        device=device,
        rank=rank,
        world=world,
        train=data.train.to(device) if on_device else data.train,
        test=data.test.to(device) if on_device else data.test,
        val=val.to(device) if val is not None and on_device else val,
        unseen=unseen.to(device) if unseen is not None and on_device else unseen,
        augmentations=data.augmentations,
        collect_frames=args.feat_dim == 2 and not args.no_plots,
        frame_take=-(-FRAME_POINTS // full_batches(len(data.train), args.batch_size)),
    )
    run.scheduler = make_scheduler(run.optimizer, args)
    return run, data, resuming, lock


def resume(run: Run, data: Dataset, resuming: bool) -> tuple[int, EpochState | None]:
    """Restore the run from its checkpoint, if any; write args.json. Returns the first epoch to train
    and the unfinished epoch's accumulators (None: start it afresh)."""
    args, rank = run.args, run.rank
    start_epoch, state = 1, None
    if resuming:
        ckpt = load_checkpoint(run.dir / "checkpoint.pt", run)
        start_epoch, state = ckpt["epoch"] + 1, ckpt["epoch_state"]
        log(
            rank,
            f"resuming {run.dir} after epoch {ckpt['epoch']}"
            + (f", step {state.step}" if state else ""),
        )
    if rank == 0:
        write_json(run.dir / "args.json", {**vars(args), "world_size": run.world})
    sizes = f"{len(data.train)} train / {len(data.test)} test, {data.source}"
    log(
        rank,
        f"{args.loss} on {data.name} ({sizes}), {args.model} feat_dim={args.feat_dim}, {run.device}",
    )
    return start_epoch, state


def loop(run: Run, data: Dataset, start_epoch: int, state: EpochState | None) -> int | None:
    """Train the epochs from start_epoch on, a checkpoint after each. Returns the exit code if a signal stopped it, else None."""
    args, rank, device = run.args, run.rank, run.device
    writer = None
    if args.tensorboard and rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        # not through a link
        writer = SummaryWriter(str(visualize.own_folder(run.dir, "tensorboard")))
    stop = {"signal": None}
    previous = {
        s: signal.signal(s, lambda signum, frame: stop.update(signal=signum)) for s in STOP_SIGNALS
    }
    try:
        for epoch in range(start_epoch, args.epochs + 1):
            if state is None:
                aug = torch.Generator(device).manual_seed(
                    epoch_generator(args.seed, epoch).initial_seed() + 1
                )
                state = EpochState.new(len(data.classes), args.feat_dim, device, aug)
            started, step_before = time.perf_counter(), state.step
            # small: one copy an epoch
            before = [p.detach().clone() for p in run.model.parameters()]
            stopped = train_epoch(run, epoch, state, stop)
            elapsed = time.perf_counter() - started
            run.train_seconds += elapsed
            run.samples += (state.step - step_before) * args.batch_size
            if stopped:
                if rank == 0:
                    atomic_torch_save(checkpoint(run, epoch - 1, state), run.dir / "checkpoint.pt")
                    interrupted = f"interrupted at epoch {epoch} step {state.step}; checkpoint saved, run the same command to resume"
                    print(interrupted, file=sys.stderr)
                return 128 + stop["signal"]
            if step_before == 0:  # a whole epoch (a resumed one may have had a single step left)
                check_moved(run, epoch, before)
            row, test_features = epoch_row(run, epoch, state, elapsed)
            run.bad_steps += row["bad_steps"]
            metric = row["val_acc"] if run.val is not None else row["test_acc"]
            run.scheduler.step(from_rank0(metric, device))  # one schedule for every rank
            # one schedule: the sparse centers' lr decays with the model's
            if run.center_optimizer is not None:
                run.center_optimizer.param_groups[0]["lr"] = (
                    args.lr_cent * run.optimizer.param_groups[0]["lr"] / args.lr
                )
            run.history.append(row)
            if rank == 0:
                end_epoch(run, data, epoch, state, row, test_features, writer)
            accs = f"train acc {row['train_acc']:.4f}  test acc {row['test_acc']:.4f}  ncm acc {row['ncm_acc']:.4f}"
            log(
                rank,
                f"epoch {epoch}/{args.epochs}  loss {row['train_loss']:.4f}  {accs}  lr {row['lr']:.3g}  {elapsed:.1f}s",
            )
            state = None
            if stop_agreed(run, stop):
                if rank == 0:
                    after = f"interrupted after epoch {epoch}'s training (during its evaluation or writing)"
                    print(
                        f"{after}; its checkpoint is saved, run the same command to resume",
                        file=sys.stderr,
                    )
                return 128 + stop["signal"]
    finally:
        # start-up is over: a signal from here on is a KeyboardInterrupt carrying it
        for s, handler in previous.items():
            signal.signal(s, interrupt if handler is interrupted_at_startup else handler)
        if writer is not None:
            writer.close()
    return None


def end_epoch(
    run: Run,
    data: Dataset,
    epoch: int,
    state: EpochState,
    row: dict,
    test_features: torch.Tensor,
    writer,
) -> None:
    """Rank 0 after an epoch: metrics.csv, the points of the epoch's two 2-D frames (train: spread over its steps; test: the
    first FRAME_POINTS) with the centers as .npz files for finish() to draw, the checkpoint, TensorBoard."""
    args = run.args
    write_csv(run.dir / "metrics.csv", run.history, COLUMNS)
    if run.collect_frames and (epoch % args.plot_every == 0 or epoch == args.epochs):
        centers = (
            run.objective.centers.detach().cpu() if run.objective.centers is not None else None
        )
        train_points = (torch.cat(state.frame_features).cpu(), torch.cat(state.frame_labels).cpu())
        test_points = (test_features[:FRAME_POINTS].cpu(), data.test.labels[:FRAME_POINTS].cpu())
        for split, (features, labels) in (("train", train_points), ("test", test_points)):
            title = f"{args.loss} {data.name} epoch {epoch}  loss {row[f'{split}_loss']:.3f}  acc {row[f'{split}_acc']:.4f}"
            visualize.save_frame_data(run.dir, split, epoch, features, labels, centers, title)
    atomic_torch_save(checkpoint(run, epoch, None), run.dir / "checkpoint.pt")
    if writer is not None:
        n = EMBEDDING_POINTS if epoch == args.epochs else 0
        embedding = (
            test_features[:n],
            data.test.images[:n],
            [data.classes[k] for k in data.test.labels[:n].tolist()],
        )
        visualize.log_tensorboard(
            writer, epoch, row, run.objective.centers, embedding if n else None
        )


def finish(run: Run, data: Dataset) -> None:
    """After the last epoch: final pictures, then summary.json, whose presence marks a finished run.
    A model whose final test loss is not finite has diverged: TrainingError, no summary."""
    args, run_dir = run.args, run.dir
    test_loss = run.history[-1]["test_loss"]
    if not math.isfinite(test_loss):
        raise TrainingError(
            f"the final test loss is {test_loss}: the model diverged (its training steps stayed finite); no summary.json was written, "
            f"the checkpoint is kept in {run_dir}; try a lower --lr or --inter-margin"
        )
    pictures = []
    if not args.no_plots:
        if args.feat_dim == 2:
            visualize.draw_frames(run_dir, data.classes)
            pictures = visualize.make_run_gifs(run_dir)
            if args.tensorboard:
                visualize.log_frames_to_tensorboard(run_dir)
        else:
            subset = torch.randperm(
                len(data.train), generator=torch.Generator().manual_seed(args.seed)
            )[:PROJECTION_POINTS]
            train_subset = ImageData(data.train.images[subset], data.train.labels[subset])
            for name, split in (("train", train_subset), ("test", data.test)):
                path, title = (
                    run_dir / f"{name}.png",
                    f"{args.loss} {data.name} feat_dim={args.feat_dim} ({name})",
                )
                visualize.save_projection(
                    path,
                    embed(run, split).cpu(),
                    split.images.cpu(),
                    split.labels.cpu(),
                    data.classes,
                    title,
                    method=args.projection,
                )
                pictures.append(path)
    summary = run_summary(run, data)
    write_json(run_dir / "summary.json", summary)
    if pictures:
        log(0, "pictures: " + ", ".join(map(str, pictures)))
    if args.dataset == "digits":
        log(
            0,
            "next: python main.py --dataset mnist --data-dir DIR --epochs 3   (MNIST in DIR/MNIST/raw, downloaded there if missing)",
        )
    speed = f"{summary['samples_per_second']:.0f} samples/s"
    log(
        0,
        f"done: acc {summary['acc']:.4f} (best {summary['best_acc']:.4f}), ncm acc {summary['ncm_acc']:.4f}, {speed} -> {run_dir}",
    )


def main(argv: list[str] | None = None) -> int:
    world, code, threads = 1, None, torch.get_num_threads()  # --threads holds for this call only
    # closed (>&-): Python's is None; fd 1 or 2 to nowhere, before a file takes it
    for name in ("stdout", "stderr"):
        setattr(sys, name, getattr(sys, name) or open(os.devnull, "w"))
    # a run name the terminal's encoding lacks must not fail a finished run
    sys.stdout.reconfigure(errors="backslashreplace")
    try:
        args = parse_args(argv)
        rank, world = init_distributed(resolve_device(args.device))
        code = train(args, rank, world)
        return code
    except (
        DataError,
        CheckpointError,
        RunFolderError,
        TrainingError,
        visualize.StitchError,
        DistributedError,
        WriteError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the training loop installs its handlers: nothing to save yet
        print(STARTUP_INTERRUPT, file=sys.stderr)
        return 130
    except (
        RuntimeError
    ) as exc:  # the CPU allocator reports a failed allocation as a plain RuntimeError
        if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate memory" not in str(exc):
            raise
        reason = str(exc).strip().splitlines()[0]
        print(
            f"error: out of memory ({reason}); use a smaller --batch-size or --feat-dim",
            file=sys.stderr,
        )
        return 1
    finally:
        torch.set_num_threads(threads)
        if world > 1:
            close_distributed(finished=code is not None)


# interrupted_at_startup stays until the training loop installs its handlers
if __name__ == "__main__":
    sys.exit(main())
