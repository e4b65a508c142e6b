"""Train a CNN with softmax (xent), softmax + center loss (cent) or the standalone center loss.

    python main.py                                                   # digits, offline, a few minutes
    python main.py --loss standalone --dataset mnist --data-dir ../shared/data --feat-dim 2

Each run writes runs/<loss>-<dataset>-feat=<d>/: args.json, metrics.csv (one row per epoch),
checkpoint.pt (every epoch; an unfinished run resumes from it), frames/ (2-D features) and, once
finished, summary.json. Exit codes: 0 done, 1 data/checkpoint error or divergence, 2 bad arguments,
130/143/129 interrupted by SIGINT/SIGTERM/SIGHUP after saving a checkpoint.
"""

import argparse
import math
import os
import signal
import sys
import time

if sys.version_info < (3, 10):  # noqa: UP036 (the one line an older Python gets, not a traceback)
    sys.exit(f"error: this code needs Python 3.10 or newer, not {sys.version.split()[0]}")
# Ctrl-C, a batch system's stop, a closed terminal (Windows has no SIGHUP): each saves a checkpoint.
STOP_SIGNALS = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s]
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

import checkpoints
import datasets
import distributed
import visualize
from batches import full_batches
from checkpoints import check_run_dir, checkpoint, load_checkpoint, make_run_dir, usage_error
from config import parse_args
from datasets import DataError, Dataset, ImageData, load_dataset
from distributed import close_distributed, from_rank0, init_distributed, rank0_first
from epoch import TrainingError, aug_generator, check_moved, log, stop_agreed, train_epoch
from evaluation import COLUMNS, embed, epoch_row, run_summary
from models import MIN_SIDE
from training import EpochState, Run, build_trainer, cuda_backends, make_scheduler
from utils import WriteError, atomic_torch_save, resolve_device, write_csv, write_json

FRAME_POINTS = 5000  # points per 2-D frame: enough to see the clusters, under a second to draw
PROJECTION_POINTS = 2000
EMBEDDING_POINTS = 2000  # TensorBoard projector: test features with their thumbnails
# a run that cannot go on: one line, exit code 1
ERRORS = (DataError, TrainingError, WriteError, visualize.StitchError, distributed.DistributedError)
ERRORS += (checkpoints.CheckpointError, checkpoints.RunFolderError)


def train(args: argparse.Namespace, rank: int, world: int) -> int:
    """Build the run, resume it if a checkpoint is there (writing args.json), train the epochs, finish
    (rank 0), in its folder locked by rank 0."""
    run, data, resuming, lock = build(args, rank, world)
    try:
        start_epoch, state = 1, None  # state: the unfinished epoch's accumulators
        if resuming:
            ckpt = load_checkpoint(run.dir / "checkpoint.pt", run)
            start_epoch, state = ckpt["epoch"] + 1, ckpt["epoch_state"]
            step = f", step {state.step}" if state else ""
            log(rank, f"resuming {run.dir} after epoch {ckpt['epoch']}{step}")
        if rank == 0:
            write_json(run.dir / "args.json", {**vars(args), "world_size": world})
        sizes = f"{len(data.train)} train / {len(data.test)} test, {data.source}"
        model = f"{args.model} feat_dim={args.feat_dim}, {run.device}"
        log(rank, f"{args.loss} on {data.name} ({sizes}), {model}")
        stopped = loop(run, data, start_epoch, state)
        if stopped is not None or rank != 0:
            return stopped or 0
        previous = {s: signal.signal(s, interrupt) for s in STOP_SIGNALS}
        try:
            finish(run, data)
        except KeyboardInterrupt as exc:  # pictures and summary are redone from the checkpoint
            drawing = "interrupted while drawing the final pictures and writing summary.json"
            finish_it = f"the checkpoint of epoch {args.epochs} is saved, run the same command to finish the run"
            print(f"{drawing}; {finish_it}", file=sys.stderr)
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
    unseen, n = None, args.train_samples
    if args.train_classes is not None:
        try:
            classes = datasets.parse_class_list(args.train_classes, data.classes)
            data, unseen = datasets.open_set_split(data, classes)
        except ValueError as exc:
            raise SystemExit(usage_error(str(exc))) from None
    if n is not None:
        data.train = ImageData(data.train.images[:n], data.train.labels[:n])
    present = data.train.labels.unique()
    if len(present) < 2:  # also after --train-samples: the losses compare classes
        only = f"the train set has only the class {data.classes[int(present[0])]!r}"
        first = f" in its first --train-samples {n}" if n is not None else ""
        raise DataError(f"{data.source}: {only}{first}; a classifier needs at least two")
    val = None
    if args.val_fraction > 0:
        data.train, val = datasets.split_validation(data.train, args.val_fraction, args.seed)
    if len(data.train) < args.batch_size:
        few = f"the train set has {len(data.train)} samples, fewer than one batch of --batch-size {args.batch_size}"
        use = "use a smaller --batch-size or more --train-samples"
        raise SystemExit(usage_error(f"{few} (the last partial batch is dropped); {use}"))
    side, need = data.image_size, MIN_SIDE[args.model]
    if side < need:
        small = f"--model {args.model} needs images of at least {need}x{need} pixels and {args.data_dir or args.dataset} has {side}x{side}"
        other = " or --model resnet" if args.model != "resnet" else ""
        raise SystemExit(usage_error(f"{small}; use larger images{other}"))
    run_dir, resuming = check_run_dir(args)
    if world > 1:  # every process has checked before rank 0 deletes or creates anything
        dist.barrier()
    lock = make_run_dir(run_dir, args.overwrite) if rank == 0 else None  # held until train() ends
    if rank == 0:  # again under the lock: its holder may have finished or saved a checkpoint since
        run_dir, resuming = check_run_dir(args)
    if world > 1:  # the other ranks write nothing in the folder, and only after rank 0 holds it
        dist.barrier()
    splits = {"train": data.train, "test": data.test, "val": val, "unseen": unseen}
    if args.pipeline == "fast":  # the fast path keeps the data on the training device
        splits = {key: s.to(device) if s is not None else None for key, s in splits.items()}
    run = Run(
        **splits,
        **vars(build_trainer(args, data, device, world)),
        args=args,
        dir=run_dir,
        device=device,
        rank=rank,
        world=world,
        augmentations=data.augmentations,
        collect_frames=args.feat_dim == 2 and not args.no_plots,
        frame_take=-(-FRAME_POINTS // full_batches(len(data.train), args.batch_size)),
    )
    run.scheduler = make_scheduler(run.optimizer, args)
    return run, data, resuming, lock


def loop(run: Run, data: Dataset, start_epoch: int, state: EpochState | None) -> int | None:
    """Train the epochs from start_epoch on (state: the unfinished epoch's, None: afresh), a
    checkpoint after each. Returns the exit code if a signal stopped it, else None."""
    args, rank = run.args, run.rank
    writer = None
    if args.tensorboard and rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(visualize.own_folder(run.dir, "tensorboard")))  # not via a link
    stop, message = {"signal": None}, None
    previous = {
        s: signal.signal(s, lambda signum, frame: stop.update(signal=signum)) for s in STOP_SIGNALS
    }
    try:
        for epoch in range(start_epoch, args.epochs + 1):
            if state is None:
                aug = aug_generator(run, epoch)
                state = EpochState.new(len(data.classes), args.feat_dim, run.device, aug)
            started, step_before = time.perf_counter(), state.step
            before = [p.detach().clone() for p in run.model.parameters()]  # one copy an epoch
            stopped = train_epoch(run, epoch, state, stop)
            elapsed = time.perf_counter() - started
            run.train_seconds += elapsed
            run.samples += (state.step - step_before) * args.batch_size
            if stopped:
                if rank == 0:
                    atomic_torch_save(checkpoint(run, epoch - 1, state), run.dir / "checkpoint.pt")
                message = f"interrupted at epoch {epoch} step {state.step}; checkpoint saved"
                break
            if step_before == 0:  # a whole epoch (a resumed one may have had a single step left)
                check_moved(run, epoch, before)
            row, test_features = epoch_row(run, epoch, state, elapsed)
            run.bad_steps += row["bad_steps"]
            metric = row["val_acc"] if run.val is not None else row["test_acc"]
            run.scheduler.step(from_rank0(metric, run.device))  # one schedule for every rank
            lr = run.optimizer.param_groups[0]["lr"]
            if run.center_optimizer is not None:  # the sparse centers' lr decays with the model's
                run.center_optimizer.param_groups[0]["lr"] = args.lr_cent * lr / args.lr
            run.history.append(row)
            if rank == 0:
                end_epoch(run, data, state, row, test_features, writer)
            accs = "  ".join(f"{s} acc {row[f'{s}_acc']:.4f}" for s in ("train", "test", "ncm"))
            head = f"epoch {epoch}/{args.epochs}  loss {row['train_loss']:.4f}"
            log(rank, f"{head}  {accs}  lr {row['lr']:.3g}  {elapsed:.1f}s")
            state = None
            if stop_agreed(run, stop):
                message = (
                    f"interrupted after epoch {epoch}'s training (during its evaluation or writing)"
                    "; its checkpoint is saved"
                )
                break
    finally:
        # start-up is over: a signal from here on is a KeyboardInterrupt carrying it
        for s, handler in previous.items():
            signal.signal(s, interrupt if handler is interrupted_at_startup else handler)
        if writer is not None:
            writer.close()
    if message is None:
        return None
    if rank == 0:
        print(f"{message}, run the same command to resume", file=sys.stderr)
    return 128 + stop["signal"]


def end_epoch(
    run: Run, data: Dataset, state: EpochState, row: dict, features: torch.Tensor, writer
) -> None:
    """Rank 0 after an epoch: metrics.csv, the points of the epoch's two 2-D frames (train: spread over
    its steps; test: the first FRAME_POINTS) with the centers as .npz files for finish() to draw, the
    checkpoint, TensorBoard."""
    args, epoch, centers = run.args, row["epoch"], run.objective.centers
    write_csv(run.dir / "metrics.csv", run.history, COLUMNS)
    if run.collect_frames and (epoch % args.plot_every == 0 or epoch == args.epochs):
        frame_centers = centers.detach().cpu() if centers is not None else None
        train_points = (torch.cat(state.frame_features).cpu(), torch.cat(state.frame_labels).cpu())
        test_points = (features[:FRAME_POINTS].cpu(), data.test.labels[:FRAME_POINTS].cpu())
        for split, (points, labels) in (("train", train_points), ("test", test_points)):
            scores = f"loss {row[f'{split}_loss']:.3f}  acc {row[f'{split}_acc']:.4f}"
            title = f"{args.loss} {data.name} epoch {epoch}  {scores}"
            visualize.save_frame_data(run.dir, split, epoch, points, labels, frame_centers, title)
    atomic_torch_save(checkpoint(run, epoch, None), run.dir / "checkpoint.pt")
    if writer is not None:
        n = EMBEDDING_POINTS if epoch == args.epochs else 0
        names = [data.classes[k] for k in data.test.labels[:n].tolist()]
        embedding = (features[:n], data.test.images[:n], names) if n else None
        visualize.log_tensorboard(writer, epoch, row, centers, embedding)


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
    if not args.no_plots and args.feat_dim == 2:
        visualize.draw_frames(run_dir, data.classes)
        pictures = visualize.make_run_gifs(run_dir)
        if args.tensorboard:
            visualize.log_frames_to_tensorboard(run_dir)
    elif not args.no_plots:
        seeded = torch.Generator().manual_seed(args.seed)
        subset = torch.randperm(len(data.train), generator=seeded)[:PROJECTION_POINTS]
        train_subset = ImageData(data.train.images[subset], data.train.labels[subset])
        for name, split in (("train", train_subset), ("test", data.test)):
            pictures.append(run_dir / f"{name}.png")
            title = f"{args.loss} {data.name} feat_dim={args.feat_dim} ({name})"
            points, images, labels = embed(run, split).cpu(), split.images.cpu(), split.labels.cpu()
            visualize.save_projection(
                pictures[-1], points, images, labels, data.classes, title, args.projection
            )
    summary = run_summary(run, data)
    write_json(run_dir / "summary.json", summary)
    if pictures:
        log(0, "pictures: " + ", ".join(map(str, pictures)))
    if args.dataset == "digits":
        mnist = "(MNIST in DIR/MNIST/raw, downloaded there if missing)"
        log(0, f"next: python main.py --dataset mnist --data-dir DIR --epochs 3   {mnist}")
    accs = f"acc {summary['acc']:.4f} (best {summary['best_acc']:.4f}), ncm acc {summary['ncm_acc']:.4f}"
    log(0, f"done: {accs}, {summary['samples_per_second']:.0f} samples/s -> {run_dir}")


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
    except ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the training loop installs its handlers: nothing to save yet
        print(STARTUP_INTERRUPT, file=sys.stderr)
        return 130
    # the CPU allocator reports a failed allocation as a plain RuntimeError
    except RuntimeError as exc:
        if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate memory" not in str(exc):
            raise
        reason = str(exc).strip().splitlines()[0]
        use = "use a smaller --batch-size or --feat-dim"
        print(f"error: out of memory ({reason}); {use}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)
        if world > 1:
            close_distributed(finished=code is not None)


# interrupted_at_startup stays until the training loop installs its handlers
if __name__ == "__main__":
    sys.exit(main())
