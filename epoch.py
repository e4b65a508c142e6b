"""One epoch of training, read by main.py's loop: the steps over the epoch's batches (train_epoch)
and the checks after them: divergence, an epoch that moved no weight, a signal the ranks agree on."""

import os
import sys

import torch
import torch.distributed as dist
from tqdm import tqdm

from batches import full_batches, loader_batches, shard_order, tensor_batches
from evaluation import acc_predictions
from training import TERMS, EpochState, Run, train_step
from utils import epoch_generator

LOG_EVERY = 20  # steps between host syncs: divergence check, progress bar, torchrun stop agreement


class TrainingError(Exception):
    """A run that cannot go on (corrupt checkpoint, divergence); reported as one line, exit code 1."""


def record_step(run: Run, state: EpochState, features, logits, y, loss, terms, bad, finite) -> None:
    """What the epoch keeps of one step (train_step's outputs): loss, terms, accuracy, class sums and the
    first run.frame_take points of every batch for the train frame (spread over the epoch). No host sync."""
    # a bad step's points are not drawn
    features = torch.where(finite, features.detach().float(), torch.nan)
    centers = run.objective.centers.detach() if run.objective.centers is not None else None
    correct = (acc_predictions(run.args.loss, features, logits.detach(), centers) == y).sum()
    state.add(loss, terms, features, y, correct, finite, bad)
    if run.collect_frames:
        state.frame_features.append(features[: run.frame_take])
        state.frame_labels.append(y[: run.frame_take])


def train_epoch(run: Run, epoch: int, state: EpochState, stop: dict) -> bool:
    """One pass over the shuffled train set's full batches from state.step, updating `state`; returns whether a signal stopped it."""
    args, data, rank, world = run.args, run.train, run.rank, run.world
    order = torch.randperm(len(data), generator=epoch_generator(args.seed, epoch))
    aug = torch.Generator(run.device)
    try:
        aug.set_state(state.aug)
    # a checkpoint cut short on another kind of device: a CPU generator's state does not fit a CUDA one
    except RuntimeError:
        aug = aug_generator(run, epoch, state.step)
        misfit = f"the checkpoint's augmentation state does not fit {run.device}"
        log(rank, f"{misfit}: the rest of epoch {epoch} is re-seeded")
    augs, start = run.augmentations, state.step
    if args.pipeline == "fast":
        batches = tensor_batches(data, order, args.batch_size, augs, aug, start, rank, world)
    else:
        shard = shard_order(order, args.batch_size, rank, world)
        generator = epoch_generator(args.seed * world + rank, epoch)
        batches = loader_batches(
            data, shard, args.batch_size // world, augs, generator, args.workers, run.device, start
        )
    run.net.train()
    total, hide = full_batches(len(data), args.batch_size), rank != 0 or not sys.stderr.isatty()
    bar = tqdm(
        batches, total=total, initial=start, desc=f"epoch {epoch}", leave=False, disable=hide
    )
    for x, y in bar:
        record_step(run, state, *train_step(run, x, y))
        state.aug = aug.get_state()
        if state.step % LOG_EVERY == 0:
            check_divergence(run, epoch, state)
            if not bar.disable:
                good = max(state.good_steps(), 1)
                loss = float(state.loss_sums[0]) / good
                acc = int(state.correct) / (good * args.batch_size)
                bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.4f}")
        if (world == 1 or state.step % LOG_EVERY == 0) and stop_agreed(run, stop):
            check_divergence(run, epoch, state)  # before the interrupted run's checkpoint
            return True
    check_divergence(run, epoch, state)
    if state.good_steps() == 0:
        raise TrainingError(
            f"training diverged: every one of the {state.step} steps of epoch {epoch} was non-finite and taken back, "
            f"so the epoch learned nothing; {kept_checkpoint(run)}; try a lower --lr or loss weight"
        )
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
    """Stop once --max-bad-steps steps were non-finite (each skipped: no bad update remains) or a finite step made a weight
    non-finite (too large an update), before a checkpoint holds it. A host sync: every LOG_EVERY steps and before each checkpoint."""
    weights = [*run.model.parameters(), *run.objective.parameters()]
    if not bool(torch.stack([torch.isfinite(p).all() for p in weights]).all()):
        raise TrainingError(
            f"training diverged: a weight is no longer finite at epoch {epoch} step {state.step}, after a step whose loss and "
            f"gradients were finite (too large an update); {kept_checkpoint(run)}; try a lower --lr"
        )
    bad = run.bad_steps + int(state.bad_steps)
    if bad >= run.args.max_bad_steps:
        step, *values = state.last_bad.tolist()
        named = ", ".join(f"{k}={v:.4g}" for k, v in zip(("loss", *TERMS), values))
        raise TrainingError(
            f"training diverged: {bad} non-finite steps, the last at epoch {epoch} step {int(step)} ({named}); "
            f"no bad update was applied and {kept_checkpoint(run)}; try a lower --lr or --inter-margin"
        )


def check_moved(run: Run, epoch: int, before: list[torch.Tensor]) -> None:
    """Stop a run whose epoch at the user's --lr did not move the model: ||w - w_before|| <= 2^-23 ||w_before|| (float32's
    resolution; zero-initialised biases still move by ~lr, so no exact equality), e.g. --lr 1e-30, whose every update is below
    the spacing of its weight: the run would end "done" having learned nothing. One host sync an epoch."""
    pairs = zip(run.model.parameters(), before)
    norms = [torch.stack([(p - b).norm(), b.norm()]) for p, b in pairs]
    change, size = torch.stack(norms).norm(dim=0).tolist()
    lr = run.optimizer.param_groups[0]["lr"]  # a decayed lr's stall is the schedule's, not an error
    if lr == run.args.lr and change <= size * 2**-23:
        raise TrainingError(
            f"no weight changed during epoch {epoch} (by {change:.2g}, weights of norm {size:.3g}): --lr {lr:g} is too small "
            f"to move float32 weights; {kept_checkpoint(run)}; give a larger --lr (or larger loss weights)"
        )


def kept_checkpoint(run: Run) -> str:
    if (run.dir / "checkpoint.pt").is_file():
        return f"the last good checkpoint is kept in {run.dir}"
    return "no checkpoint was saved (none of an earlier epoch)"


def aug_generator(run: Run, epoch: int, step: int = 0) -> torch.Generator:
    """The augmentation generator of an epoch (re)started at `step`, seeded by (--seed, epoch, step)."""
    seed = epoch_generator(run.args.seed, epoch).initial_seed() + 1 + step
    return torch.Generator(run.device).manual_seed(seed)


def log(rank: int, message: str) -> None:
    if rank == 0:
        try:
            print(message, flush=True)
        # stdout into `head -1`, which has left: the run goes on, its lines to nowhere
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
