"""Evaluation after an epoch: features in eval mode, the study's accuracy, the metrics.csv row."""

import os
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor

import metrics
from datasets import Dataset, ImageData
from losses import CENTER_ACC_LOSSES
from training import TERMS, EpochState, Run
from utils import chunk_rows

EVAL_BATCH = 1024
VALIDATION = ("val_acc", "best_val_acc", "best_val_epoch", "test_acc_at_best_val")  # summary.json
COLUMNS = [  # metrics.csv
    "epoch", "lr", "train_loss", "train_xent", "train_intra", "train_inter", "train_acc",
    "test_loss", "test_xent", "test_intra", "test_inter", "test_acc", "ncm_acc", "center_acc", "val_acc",
    *metrics.FEATURE_METRICS, *metrics.GEOMETRY_METRICS, *metrics.OPEN_SET_METRICS,
    "bad_steps", "seconds",
]  # fmt: skip


@torch.no_grad()
def nearest(features: Tensor, points: Tensor, exclude: Tensor | None = None) -> Tensor:
    """Index of the nearest row of `points` (torch.cdist) for every feature, never one where `exclude` is true; in
    chunks of features holding at most utils.CHUNK_BYTES of distances (100,000 centers: a few hundred features)."""
    found = []
    for chunk in features.float().split(chunk_rows(len(points))):
        d = torch.cdist(chunk, points.float())
        found.append((d if exclude is None else d.masked_fill(exclude, float("inf"))).argmin(1))
    return torch.cat(found)


def acc_predictions(
    loss: str, features: Tensor, logits: Tensor | None, centers: Tensor | None
) -> Tensor:
    """The study's accuracy: nearest center for losses without a softmax (CENTER_ACC_LOSSES), else argmax of the logits."""
    return nearest(features, centers) if loss in CENTER_ACC_LOSSES else logits.argmax(1)


def hit_rate(predictions: Tensor, labels: Tensor) -> float:
    return (predictions == labels).float().mean().item()


@torch.no_grad()
def embed(run: Run, data: ImageData) -> Tensor:
    """Features of `data` in eval mode, float32 under every --amp, no augmentation, in large batches (logits: eval_logits)."""
    # The plain module, not the DDP wrapper: every rank evaluates the whole set, with no collectives.
    model, device, features = run.model, run.device, []
    model.eval()
    layout = torch.channels_last if run.channels_last else torch.contiguous_format
    # Autocast off: acc and the metrics compare across every --amp only from float32 features (torch 2.4
    # has no autocast for MPS, and refuses even a disabled one there).
    usable = torch.amp.is_autocast_available(device.type)
    with torch.autocast(device.type, enabled=False) if usable else nullcontext():
        for i in range(0, len(data), EVAL_BATCH):
            x = data.images[i : i + EVAL_BATCH].to(device, non_blocking=True).float().div_(255)
            features.append(model(x.contiguous(memory_format=layout))[0])
    model.train()
    return torch.cat(features)


def eval_logits(run: Run, features: Tensor) -> Tensor | None:
    """model.classifier's logits of some eval features (a whole set's, samples x classes, would not fit at 100,000 classes),
    None for the losses that never read them (CENTER_ACC_LOSSES)."""
    return run.model.classifier(features) if run.args.loss not in CENTER_ACC_LOSSES else None


@torch.no_grad()
def objective_stats(run: Run, features: Tensor, labels: Tensor) -> list[float]:
    """The loss and its TERMS on evaluation features in chunks of --batch-size, so that pairwise terms have the train loss's scale."""
    sums = torch.zeros(1 + len(TERMS), device=features.device, dtype=torch.float64)
    for f, y in zip(features.split(run.args.batch_size), labels.split(run.args.batch_size)):
        loss, terms = run.objective(f, eval_logits(run, f), y)
        values = [loss] + [terms.get(t, loss.new_zeros(())) for t in TERMS]
        sums += torch.stack(values).double() * len(y)
    return (sums / len(labels)).tolist()


@torch.no_grad()
def accuracy(run: Run, data: ImageData) -> tuple[float, Tensor]:
    """The study's accuracy on `data`, with its features."""
    features, loss, centers = embed(run, data), run.args.loss, run.objective.centers
    chunks = features.split(EVAL_BATCH)
    predictions = [acc_predictions(loss, f, eval_logits(run, f), centers) for f in chunks]
    return hit_rate(torch.cat(predictions), data.labels.to(features.device)), features


def epoch_row(run: Run, epoch: int, state: EpochState, seconds: float) -> tuple[dict, Tensor]:
    """Evaluate after an epoch and assemble its metrics.csv row; returns the row and test features.
    ncm_acc: the nearest mean of the epoch's train features (classes never seen are never predicted)."""
    args, centers, test = run.args, run.objective.centers, run.test
    test_acc, features = accuracy(run, test)
    labels = test.labels.to(features.device)
    s, stats = state.loss_sums.tolist(), objective_stats(run, features, labels)
    batches, count = max(state.good_steps(), 1), state.class_count
    row = {"epoch": epoch, "lr": run.optimizer.param_groups[0]["lr"], "train_loss": s[0] / batches}
    for i, t in enumerate(TERMS, start=1):
        used = t in run.objective.terms_used
        row[f"train_{t}"], row[f"test_{t}"] = (s[i] / batches, stats[i]) if used else (None, None)
    means = state.class_sum / count.clamp_min(1)[:, None]
    row |= {
        "train_acc": int(state.correct) / (batches * args.batch_size),
        "test_loss": stats[0],
        "test_acc": test_acc,
        "ncm_acc": hit_rate(nearest(features, means, exclude=count == 0), labels),
        "center_acc": None if centers is None else hit_rate(nearest(features, centers), labels),
        "val_acc": accuracy(run, run.val)[0] if run.val is not None else None,
        **metrics.class_geometry(features, labels),
    }
    if (unseen := run.unseen) is not None:  # open set: retrieval among classes never trained on
        scores = metrics.retrieval_scores(embed(run, unseen), unseen.labels.to(features.device))
        row |= {f"open_{name}": value for name, value in scores.items()}
    if epoch == args.epochs or (args.eval_every and epoch % args.eval_every == 0):
        train = (embed(run, run.train), run.train.labels.to(features.device))
        row |= metrics.feature_metrics(features, labels, *train, args.seed)
    return row | {"bad_steps": int(state.bad_steps), "seconds": seconds}, features


def run_summary(run: Run, data: Dataset) -> dict:
    """summary.json: settings (paths relative to the run folder), last epoch's metrics, best accuracy, speed, bad steps. `train_acc` is the last epoch's
    running accuracy on augmented batches; `clean_train_acc` the final model's on the plain train set (eval mode,
    the run's accuracy rule): with `acc`, the finished model's train/test gap."""
    args, history = run.args, run.history
    last, data_dir = history[-1], args.data_dir and str(Path(args.data_dir))
    # model selection on the held-out split: the epoch of best val_acc and the test accuracy then
    best = max(history, key=lambda r: r["val_acc"]) if last["val_acc"] is not None else None
    selected = (last["val_acc"], best["val_acc"], best["epoch"], best["test_acc"]) if best else ()

    def rel(path) -> str:  # to the run folder: a summary names no folder of the machine it ran on
        try:
            return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(run.dir))).as_posix()
        except ValueError:  # Windows: no relative path to another drive
            return Path(path).name

    source = data.source.replace(data_dir, rel(data_dir)) if data_dir else data.source
    return {
        **vars(args),
        "out": rel(args.out),
        "data_dir": rel(data_dir) if data_dir else None,
        "num_classes": len(data.classes),
        "train_size": len(data.train),
        "test_size": len(data.test),
        "augmentations": list(data.augmentations),
        "data_source": source,
        "data_files": [rel(f) for f in data.files],
        "acc": last["test_acc"],
        "best_acc": max(r["test_acc"] for r in history),
        **{name: last[name] for name in ("ncm_acc", "center_acc", "train_acc")},
        "clean_train_acc": accuracy(run, run.train)[0],
        "epochs": len(history),
        "train_seconds": run.train_seconds,
        "samples_per_second": run.samples / max(run.train_seconds, 1e-9),
        "bad_steps": run.bad_steps,
        **{name: last[name] for name in (*metrics.FEATURE_METRICS, *metrics.GEOMETRY_METRICS)},
        **{name: last[name] for name in metrics.OPEN_SET_METRICS if run.unseen is not None},
        "classes": data.classes,
        **dict(zip(VALIDATION, selected)),
        "device": str(run.device),
        "peak_gpu_memory_mb": torch.cuda.max_memory_allocated(run.device) / 2**20
        if run.device.type == "cuda"
        else None,
        "torch": torch.__version__,
    }
