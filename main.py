"""Train a CNN with softmax (xent), softmax + center loss (cent) or the standalone center loss.

    python main.py                                                   # digits, offline, a few minutes
    python main.py --loss standalone --dataset mnist --data-dir ../shared/data --feat-dim 2

Each run writes runs/<loss>-<dataset>-feat=<d>/: args.json, metrics.csv (one row per epoch),
checkpoint.pt (every epoch; an unfinished run resumes from it), frames/ (2-D features) and, once
finished, summary.json. Exit codes: 0 done, 1 data/checkpoint error or divergence, 2 bad arguments,
130/143 interrupted by SIGINT/SIGTERM after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import signal
import sys
import time
from pathlib import Path

STARTUP_INTERRUPT = "interrupted before training started; no new checkpoint was saved, run the same command to start again"


def interrupted_at_startup(signum: int, frame: object) -> None:
    print(STARTUP_INTERRUPT, file=sys.stderr)
    raise SystemExit(130)


if __name__ == "__main__":  # Ctrl-C while torch and the rest import (seconds): one line, not a traceback
    signal.signal(signal.SIGINT, interrupted_at_startup)

import torch
import torch.distributed as dist
from tqdm import tqdm

import visualize
from checkpoints import CheckpointError, check_run_dir, checkpoint, load_checkpoint, make_run_dir, out_problem, usage_error
from datasets import (
    DATASETS,
    DataError,
    Dataset,
    ImageData,
    canonical_name,
    default_workers,
    full_batches,
    load_dataset,
    loader_batches,
    shard_order,
    split_validation,
    tensor_batches,
)
from distributed import init_distributed
from evaluation import acc_predictions, embed, epoch_row, run_summary
from losses import CENTER_UPDATES, LOSSES, PAPER_UPDATE_LOSSES
from metrics import FEATURE_METRICS
from models import MODELS
from training import AMP_DTYPES, MODEL_RECIPES, TERMS, EpochState, Run, build_trainer, guarded_step
from utils import atomic_torch_save, epoch_generator, resolve_device, write_csv, write_json

COLUMNS = [
    "epoch", "lr",
    "train_loss", "train_xent", "train_intra", "train_inter", "train_acc",
    "test_loss", "test_xent", "test_intra", "test_inter", "test_acc", "ncm_acc", "center_acc", "val_acc",
    *FEATURE_METRICS,
    "bad_steps", "seconds",
]  # fmt: skip
FRAME_POINTS = 5000  # points per 2-D frame: enough to see the clusters, under a second to draw
PROJECTION_POINTS = 2000
EMBEDDING_POINTS = 2000  # TensorBoard projector: test features with their thumbnails
LOG_EVERY = 20  # steps between host syncs: divergence check, progress bar, torchrun stop agreement
STUDY = {"epochs": 100, "batch_size": 128, "patience": 10}
# digits, the offline first run: 1,437 train images of 16x16 (datasets.DIGITS_SIDE). More, smaller
# batches and a shorter patience reach test acc 0.97 in about a minute on a 2-core laptop CPU.
FIRST_RUN = {"epochs": 20, "batch_size": 64, "patience": 3}


class TrainingError(Exception):
    """A run that cannot go on (corrupt checkpoint, divergence); reported as one line, exit code 1."""


# numpy's limit (np.random.seed). The torch generators take seed * 1_000_003 + epoch (utils.epoch_generator),
# on the loader path times the torchrun world size: below their 2**64 - 1 for up to 4,294 processes.
MAX_SEED = 2**32 - 1


def finite_float(text: str) -> float:
    """argparse type of every float flag: NaN and infinity would slip through the range checks
    (every comparison with NaN is false) and poison training silently."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones whose help already says what happens."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help or "" if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--loss", choices=LOSSES, default="standalone", help="objective")
    p.add_argument("--dataset", type=canonical_name, choices=DATASETS, default="digits", help="data set (cifar-10 is accepted for cifar10)")
    p.add_argument(
        "--data-dir", default=None, help="folder with the data set (torchvision layout or train/ test/ image folders); default ./data"
    )
    p.add_argument(
        "--model",
        choices=MODELS,
        default="resnet",
        help="feature extractor: the study's resnet, or lenet++ (the center-loss paper's), which standardises its input by the train "
        "set's per-channel mean and std, starts from He initialisation and defaults to --weight-decay 5e-4 --clip-grad-norm 10",
    )
    p.add_argument("--feat-dim", type=int, default=2, help="feature dimension")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs; default 100, the study's budget (20 for digits, so that the first run takes about a minute)",
    )
    p.add_argument("--train-samples", type=int, default=None, help="train on the first N train samples only (quick checks; default all)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="global batch size, split evenly across torchrun processes (the inter term spans it); default 128, the study's (64 for digits)",
    )
    p.add_argument("--lr", type=finite_float, default=0.01, help="SGD learning rate of the model")
    p.add_argument(
        "--lr-cent",
        type=finite_float,
        default=None,
        help="SGD learning rate of the centers (default: --lr; not with --center-update paper)",
    )
    p.add_argument("--momentum", type=finite_float, default=0.9, help="SGD momentum (model and SGD centers)")
    p.add_argument(
        "--weight-decay", type=finite_float, default=None, help="SGD weight decay of the model (default: 5e-4 for lenet++, 0 for resnet)"
    )
    p.add_argument(
        "--clip-grad-norm",
        type=finite_float,
        default=None,
        help="clip the gradient norm of the model and SGD centers to this, 0: off (default: 10 for lenet++, 0 for resnet)",
    )
    p.add_argument(
        "--center-update",
        choices=CENTER_UPDATES,
        default="sgd",
        help="sgd: centers learn by their gradient; paper: after each step each center moves toward its class's batch mean "
        "(Wen et al., eq. 4; cent and standalone only)",
    )
    p.add_argument(
        "--center-alpha", type=finite_float, default=None, help="center rate of --center-update paper (default 0.5, the paper's)"
    )
    p.add_argument("--weight-cent", type=finite_float, default=1.0, help="weight of the center term in cent")
    p.add_argument("--weight-intra", type=finite_float, default=1.0, help="weight of the intra term in standalone")
    p.add_argument("--weight-inter", type=finite_float, default=0.1, help="weight of the inter term in standalone")
    p.add_argument(
        "--inter-margin",
        type=finite_float,
        default=None,
        help="truncate each pair's squared distance at this margin in the inter term (off)",
    )
    p.add_argument("--alpha", type=finite_float, default=0.05, help="centers-apart: scale of the squared distance inside exp()")
    p.add_argument(
        "--val-fraction",
        type=finite_float,
        default=0.0,
        help="hold out this fraction of train for the scheduler and model selection (0: schedule on test accuracy, as the study)",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=10,
        help="retrieval and clustering metrics every N epochs (and after the last; 0: only after the last)",
    )
    p.add_argument("--tensorboard", action="store_true", help="also log to <run folder>/tensorboard (needs the tensorboard package)")
    p.add_argument("--factor", type=finite_float, default=0.2, help="ReduceLROnPlateau factor (on test accuracy)")
    p.add_argument("--patience", type=int, default=None, help="ReduceLROnPlateau patience; default 10, the study's (3 for digits)")
    p.add_argument("--threshold", type=finite_float, default=0.1, help="ReduceLROnPlateau relative threshold")
    p.add_argument("--seed", type=int, default=0, help=f"seed of weights, data order and augmentation, 0 to {MAX_SEED}")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--pipeline",
        choices=("fast", "loader"),
        default="fast",
        help="fast: tensors on the device, batched augmentation; loader: torchvision DataLoader",
    )
    p.add_argument("--workers", type=int, default=default_workers(), help="DataLoader workers (loader pipeline)")
    p.add_argument("--amp", choices=tuple(AMP_DTYPES), default="off", help="autocast precision")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="channels_last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many non-finite steps (each one is skipped)")
    p.add_argument("--out", default="runs", help="folder of run folders")
    p.add_argument("--name", default=None, help="run folder name (default <loss>-<dataset>-feat=<feat_dim>)")
    p.add_argument("--resume", action="store_true", help="require a checkpoint to resume from (unfinished runs resume anyway)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished or unfinished run of the same name")
    p.add_argument("--no-plots", action="store_true", help="skip the per-epoch 2-D frames and the final projections")
    p.add_argument("--projection", choices=("pca", "tsne"), default="pca", help="2-D projection of the final features when feat_dim > 2")
    p.add_argument("--plot-every", type=int, default=1, help="draw a 2-D frame every N epochs (and the last)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for key, value in (FIRST_RUN if args.dataset == "digits" else STUDY).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.name is None:
        args.name = f"{args.loss}-{args.dataset}-feat={args.feat_dim}"
    checks = [
        (0 <= args.seed <= MAX_SEED, f"--seed must be an integer from 0 to {MAX_SEED} (numpy's seed range)"),
        (
            is_plain_name(args.name),
            f"--name {args.name!r} must be one plain folder name: not empty, not . or .., without / (it goes under --out)",
        ),
        (not (args.resume and args.overwrite), "--resume continues a run and --overwrite deletes it; give one of them"),
        (args.feat_dim >= 1, "--feat-dim must be at least 1"),
        (args.epochs >= 1, "--epochs must be at least 1"),
        (args.train_samples is None or args.train_samples >= 2, "--train-samples must be at least 2"),
        (args.batch_size >= 2, "--batch-size must be at least 2 (the losses compare samples of a batch)"),
        (args.lr > 0, "--lr must be positive"),
        (args.lr_cent is None or args.lr_cent >= 0, "--lr-cent must not be negative"),
        (0 <= args.momentum < 1, "--momentum must be in [0, 1)"),
        (args.weight_decay is None or args.weight_decay >= 0, "--weight-decay must not be negative"),
        (args.clip_grad_norm is None or args.clip_grad_norm >= 0, "--clip-grad-norm must not be negative (0 turns clipping off)"),
        (
            args.center_update == "sgd" or args.loss in PAPER_UPDATE_LOSSES,
            f"--center-update paper needs --loss cent or standalone, whose centers only follow the features ({args.loss} "
            + ("has no centers)" if args.loss == "xent" else "moves its centers by terms of its own)"),
        ),
        (
            args.center_alpha is None or args.center_update == "paper",
            "--center-alpha is the rate of the paper's center update; add --center-update paper or drop it",
        ),
        (args.center_alpha is None or 0 < args.center_alpha <= 1, "--center-alpha must be in (0, 1]"),
        (
            args.lr_cent is None or args.center_update == "sgd",
            "--lr-cent is the SGD centers' learning rate; with --center-update paper set --center-alpha instead",
        ),
        (min(args.weight_cent, args.weight_intra, args.weight_inter) >= 0, "loss weights must not be negative"),
        (args.inter_margin is None or args.inter_margin > 0, "--inter-margin must be positive"),
        (0 < args.factor < 1, "--factor must be in (0, 1)"),
        (args.patience >= 0 and args.threshold >= 0, "--patience and --threshold must not be negative"),
        (args.workers >= 0, "--workers must not be negative"),
        (args.max_bad_steps >= 1, "--max-bad-steps must be at least 1"),
        (args.plot_every >= 1, "--plot-every must be at least 1"),
        (0 <= args.val_fraction < 1, "--val-fraction must be in [0, 1)"),
        (args.eval_every >= 0, "--eval-every must not be negative"),
        (args.alpha > 0, "--alpha must be positive"),
        (
            args.batch_size % world == 0,
            f"--batch-size {args.batch_size} must be a multiple of the {world} processes (it is the global batch)",
        ),
        (args.data_dir is None or Path(args.data_dir).is_dir(), f"--data-dir {args.data_dir} does not exist or is not a folder"),
        (
            args.dataset != "folder" or args.data_dir is not None,
            "--dataset folder needs --data-dir DIR with DIR/train/<class>/* and DIR/test/<class>/*",
        ),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    for problem in (device_problem(args.device), out_problem(args.out)):
        if problem:
            parser.error(problem)
    if args.tensorboard:
        try:
            importlib.import_module("torch.utils.tensorboard")
        except ImportError:
            parser.error("--tensorboard needs the tensorboard package: pip install tensorboard")
    for key, value in MODEL_RECIPES[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.center_update == "paper" and args.center_alpha is None:
        args.center_alpha = 0.5  # the paper's
    if args.center_update == "sgd" and args.lr_cent is None:
        args.lr_cent = args.lr
    return args


def is_plain_name(name: str) -> bool:
    """One path component: the run folder must lie directly under --out (and --overwrite delete only it)."""
    separators = {"/", os.sep, os.altsep, "\0"} - {None}
    return name not in ("", ".", "..") and not any(sep in name for sep in separators)


def device_problem(name: str) -> str | None:
    """Why --device cannot train here, or None: a CPU, an available CUDA device, or MPS where it runs."""
    try:
        device = resolve_device(name)
    except RuntimeError:
        return f"--device {name}: not a device torch knows (try auto, cpu or cuda)"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"--device {name}: CUDA is not available here; use --device cpu"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return (
                f"--device {name}: there are {torch.cuda.device_count()} CUDA devices here (cuda:0 to cuda:{torch.cuda.device_count() - 1})"
            )
        return None
    if device.type == "mps":
        return None if torch.backends.mps.is_available() else f"--device {name}: MPS is not available here; use --device cpu"
    return f"--device {name}: not a device to train on (use auto, cpu, cuda, cuda:N or mps)"


def train_step(run: Run, state: EpochState, x: torch.Tensor, y: torch.Tensor) -> None:
    """One guarded SGD step, and what the epoch keeps of it. Nothing here waits for the host."""
    args, objective = run.args, run.objective
    features, logits, y, loss, terms, finite = guarded_step(run, x, y)
    features = torch.where(finite, features.detach().float(), torch.nan)  # a bad step's points are not drawn
    centers = objective.centers.detach() if objective.centers is not None else None
    correct = (acc_predictions(args, features, logits.detach(), centers) == y).sum()
    state.add(loss, terms, features, y, correct, finite)
    if run.collect_frames and sum(len(f) for f in state.frame_features) < FRAME_POINTS:
        state.frame_features.append(features)
        state.frame_labels.append(y)


def train_epoch(run: Run, epoch: int, state: EpochState, stop: dict) -> bool:
    """One pass over the shuffled train set's full batches, resuming at state.step; updates `state`
    in place. Returns whether it stopped for a signal."""
    args, data = run.args, run.train
    order = torch.randperm(len(data), generator=epoch_generator(args.seed, epoch))
    aug = torch.Generator(run.device).set_state(state.aug)
    rank, world = run.rank, run.world
    if args.pipeline == "fast":
        batches = tensor_batches(data, order, args.batch_size, run.augmentations, aug, state.step, rank, world)
    else:
        shard = shard_order(order, args.batch_size, rank, world)
        generator = epoch_generator(args.seed * world + rank, epoch)
        batches = loader_batches(data, shard, args.batch_size // world, run.augmentations, generator, args.workers, run.device, state.step)
    run.net.train()
    show = rank == 0 and sys.stderr.isatty()
    bar = tqdm(
        batches, total=full_batches(len(data), args.batch_size), initial=state.step, desc=f"epoch {epoch}", leave=False, disable=not show
    )
    for x, y in bar:
        train_step(run, state, x, y)
        state.aug = aug.get_state()
        if state.step % LOG_EVERY == 0:
            check_divergence(run, epoch, state)
            if not bar.disable:
                good = max(state.good_steps(), 1)
                bar.set_postfix(loss=f"{float(state.loss_sums[0]) / good:.4f}", acc=f"{int(state.correct) / (good * args.batch_size):.4f}")
        if (world == 1 or state.step % LOG_EVERY == 0) and stop_agreed(run, stop):
            return True
    check_divergence(run, epoch, state)
    return stop_agreed(run, stop)


def stop_agreed(run: Run, stop: dict) -> bool:
    """Whether to stop for a signal. Under torchrun every rank must stop at the same step, whichever
    got the signal, so the ranks agree by an all-reduce (a host sync: the loop asks every LOG_EVERY steps)."""
    if run.world > 1:
        flag = torch.tensor(stop["signal"] or 0, device=run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag) == 0:
            return False
        stop["signal"] = int(flag)
    return stop["signal"] is not None


def check_divergence(run: Run, epoch: int, state: EpochState) -> None:
    """Stop once --max-bad-steps steps were non-finite (each was taken back: no bad update remains).
    The checkpoint, if any, holds only finite weights: the guard never let a bad update through."""
    bad = run.bad_steps + int(state.bad_steps)
    if bad >= run.args.max_bad_steps:
        step, *values = state.last_bad.tolist()
        named = ", ".join(f"{k}={v:.4g}" for k, v in zip(("loss", *TERMS), values))
        kept = (
            f"the last good checkpoint is kept in {run.dir}"
            if (run.dir / "checkpoint.pt").is_file()
            else "no checkpoint was saved (none of an earlier epoch)"
        )
        raise TrainingError(
            f"training diverged: {bad} non-finite steps, the last at epoch {epoch} step {int(step)} ({named}); "
            f"no bad update was applied and {kept}; try a lower --lr or --inter-margin"
        )


def train(args: argparse.Namespace, rank: int, world: int) -> int:
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    data = load_dataset(args.dataset, args.data_dir or "data", download=True)
    if args.train_samples is not None:
        data.train = ImageData(data.train.images[: args.train_samples], data.train.labels[: args.train_samples])
    val = None
    if args.val_fraction > 0:
        data.train, val = split_validation(data.train, args.val_fraction, args.seed)
    if len(data.train) < args.batch_size:
        raise SystemExit(
            usage_error(
                f"the train set has {len(data.train)} samples, fewer than one batch of --batch-size {args.batch_size} "
                "(the last partial batch is dropped, as in the study); use a smaller --batch-size or more --train-samples"
            )
        )
    run_dir, resume = check_run_dir(args)
    if world > 1:  # every process has checked before rank 0 deletes or creates anything
        dist.barrier()
    if rank == 0:
        make_run_dir(run_dir, args.overwrite)
    if world > 1:
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
        augmentations=data.augmentations,
        collect_frames=args.feat_dim == 2 and not args.no_plots,
    )
    run.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        run.optimizer, mode="max", factor=args.factor, patience=args.patience, threshold=args.threshold
    )
    start_epoch, state = 1, None
    if resume:
        ckpt = load_checkpoint(run_dir / "checkpoint.pt", run)
        start_epoch, state = ckpt["epoch"] + 1, ckpt["epoch_state"]
        log(rank, f"resuming {run_dir} after epoch {ckpt['epoch']}" + (f", step {state.step}" if state else ""))
    if rank == 0:
        write_json(run_dir / "args.json", {**vars(args), "world_size": world})
    log(
        rank,
        f"{args.loss} on {data.name} ({len(data.train)} train / {len(data.test)} test, {data.source}), {args.model} feat_dim={args.feat_dim}, {device}",
    )

    writer = None
    if args.tensorboard and rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))
    stop = {"signal": None}
    previous = {s: signal.signal(s, lambda signum, frame: stop.update(signal=signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for epoch in range(start_epoch, args.epochs + 1):
            if state is None:
                aug = torch.Generator(device).manual_seed(epoch_generator(args.seed, epoch).initial_seed() + 1)
                state = EpochState.new(len(data.classes), args.feat_dim, device, aug)
            started = time.perf_counter()
            step_before = state.step
            stopped = train_epoch(run, epoch, state, stop)
            elapsed = time.perf_counter() - started
            run.train_seconds += elapsed
            run.samples += (state.step - step_before) * args.batch_size
            if stopped:
                if rank == 0:
                    atomic_torch_save(checkpoint(run, epoch - 1, state), run_dir / "checkpoint.pt")
                    print(
                        f"interrupted at epoch {epoch} step {state.step}; checkpoint saved, run the same command to resume",
                        file=sys.stderr,
                    )
                return 128 + stop["signal"]
            row, test_features = epoch_row(run, epoch, state, elapsed)
            run.bad_steps += row["bad_steps"]
            run.scheduler.step(row["val_acc"] if run.val is not None else row["test_acc"])
            run.history.append(row)
            if rank == 0:
                write_csv(run_dir / "metrics.csv", run.history, COLUMNS)
                if run.collect_frames and (epoch % args.plot_every == 0 or epoch == args.epochs):
                    draw_frames(run, data, epoch, state, test_features, row)
                atomic_torch_save(checkpoint(run, epoch, None), run_dir / "checkpoint.pt")
                if writer is not None:
                    n = EMBEDDING_POINTS if epoch == args.epochs else 0
                    embedding = (test_features[:n], data.test.images[:n], [data.classes[k] for k in data.test.labels[:n].tolist()])
                    frame = run_dir / "frames" / "test" / f"epoch_{epoch:03d}.png"
                    visualize.log_tensorboard(writer, epoch, row, run.objective.centers, frame, embedding if n else None)
            log(
                rank,
                f"epoch {epoch}/{args.epochs}  loss {row['train_loss']:.4f}  train acc {row['train_acc']:.4f}  "
                f"test acc {row['test_acc']:.4f}  ncm acc {row['ncm_acc']:.4f}  lr {row['lr']:.3g}  {elapsed:.1f}s",
            )
            state = None
            if stop_agreed(run, stop):
                return 128 + stop["signal"]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if writer is not None:
            writer.close()
    if rank == 0:
        try:
            finish(run, data)
        except KeyboardInterrupt:  # the signal handlers are gone: pictures and summary are redone from the checkpoint
            print(
                f"interrupted while drawing the final pictures and writing summary.json; the checkpoint of epoch {args.epochs} is saved, "
                "run the same command to finish the run",
                file=sys.stderr,
            )
            return 130
    return 0


def log(rank: int, message: str) -> None:
    if rank == 0:
        print(message, flush=True)


def draw_frames(run: Run, data: Dataset, epoch: int, state: EpochState, test_features: torch.Tensor, row: dict) -> None:
    centers = run.objective.centers
    centers = centers.detach().cpu() if centers is not None else None
    title = f"{run.args.loss} {data.name} epoch {epoch}"
    train_points = (torch.cat(state.frame_features).cpu(), torch.cat(state.frame_labels).cpu())
    test_points = (test_features[:FRAME_POINTS].cpu(), data.test.labels[:FRAME_POINTS].cpu())
    for split, (features, labels), acc in (("train", train_points, row["train_acc"]), ("test", test_points, row["test_acc"])):
        loss = row["train_loss"] if split == "train" else row["test_loss"]
        visualize.save_frame(run.dir, split, epoch, features, labels, centers, data.classes, f"{title}  loss {loss:.3f}  acc {acc:.4f}")


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
            visualize.redraw_frames(run_dir, data.classes)
            pictures = visualize.make_run_gifs(run_dir)
        else:
            subset = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(args.seed))[:PROJECTION_POINTS]
            train_subset = ImageData(data.train.images[subset], data.train.labels[subset])
            for name, split in (("train", train_subset), ("test", data.test)):
                features, _ = embed(run, split)
                visualize.save_projection(
                    run_dir / f"{name}.png",
                    features.cpu(),
                    split.images.cpu(),
                    split.labels.cpu(),
                    data.classes,
                    f"{args.loss} {data.name} feat_dim={args.feat_dim} ({name})",
                    method=args.projection,
                )
                pictures.append(run_dir / f"{name}.png")
    summary = run_summary(run, data)
    write_json(run_dir / "summary.json", summary)
    if pictures:
        print("pictures: " + ", ".join(map(str, pictures)))
    if args.dataset == "digits":
        print("next: python main.py --dataset mnist --data-dir DIR --epochs 3   (MNIST in DIR/MNIST/raw, downloaded there if missing)")
    print(
        f"done: acc {summary['acc']:.4f} (best {summary['best_acc']:.4f}), ncm acc {summary['ncm_acc']:.4f}, {summary['samples_per_second']:.0f} samples/s -> {run_dir}"
    )


def main(argv: list[str] | None = None) -> int:
    world = 1
    try:
        args = parse_args(argv)
        rank, world = init_distributed(resolve_device(args.device))
        return train(args, rank, world)
    except (DataError, CheckpointError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the training loop installs its handlers: nothing to save yet
        print(STARTUP_INTERRUPT, file=sys.stderr)
        return 130
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the imports are done: Ctrl-C is KeyboardInterrupt again
    sys.exit(main())
