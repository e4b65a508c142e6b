"""Evaluation after an epoch: features in eval mode, the study's accuracy, the metrics.csv row."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

import torch

from datasets import Dataset, ImageData
from losses import CENTER_ACC_LOSSES
from metrics import (
    FEATURE_METRICS,
    GEOMETRY_METRICS,
    OPEN_SET_METRICS,
    class_geometry,
    feature_metrics,
    retrieval_scores,
)
from training import TERMS, EpochState, Run
from utils import chunk_rows

EVAL_BATCH = 1024
COLUMNS = [  # metrics.csv
    "epoch", "lr", "train_loss", "train_xent", "train_intra", "train_inter", "train_acc",
    "test_loss", "test_xent", "test_intra", "test_inter", "test_acc", "ncm_acc", "center_acc", "val_acc",
    *FEATURE_METRICS, *GEOMETRY_METRICS, *OPEN_SET_METRICS, "bad_steps", "seconds",
]  # fmt: skip


def nearest(
    features: torch.Tensor, points: torch.Tensor, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """Index of the nearest row of `points` (torch.cdist) for every feature, never one where `exclude` is true; in
    chunks of features holding at most utils.CHUNK_BYTES of distances (100,000 centers: a few hundred features)."""
    chunks = features.float().split(chunk_rows(len(points)))
    distances = (torch.cdist(chunk, points.float()) for chunk in chunks)
    inf = float("inf")
    return torch.cat(
        [(d if exclude is None else d.masked_fill(exclude, inf)).argmin(1) for d in distances]
    )


def acc_predictions(
    loss: str, features: torch.Tensor, logits: torch.Tensor | None, centers: torch.Tensor | None
) -> torch.Tensor:
    """The study's accuracy: nearest center for losses without a softmax (CENTER_ACC_LOSSES), else argmax of the logits."""
    return nearest(features, centers) if loss in CENTER_ACC_LOSSES else logits.argmax(1)


def nearest_class_mean(
    features: torch.Tensor, class_sum: torch.Tensor, class_count: torch.Tensor
) -> torch.Tensor:
    """Index of the nearest mean of the train features seen (classes never seen are never predicted)."""
    return nearest(
        features, class_sum / class_count.clamp_min(1)[:, None], exclude=class_count == 0
    )


@torch.no_grad()
def embed(run: Run, data: ImageData) -> torch.Tensor:
    """Features of `data` in eval mode, float32 under every --amp, no augmentation, in large batches (logits: eval_logits)."""
    # The plain module, not the DDP wrapper: every rank evaluates the whole set, with no collectives.
    model, device = run.model, run.device
    model.eval()
    features = []
    # Autocast off: acc and the metrics compare across every --amp only from float32 features (torch 2.4
    # has no autocast for MPS, and refuses even a disabled one there).
    usable = torch.amp.is_autocast_available(device.type)
    with torch.autocast(device.type, enabled=False) if usable else nullcontext():
        for i in range(0, len(data), EVAL_BATCH):
            x = data.images[i : i + EVAL_BATCH].to(device, non_blocking=True).float().div_(255)
            if run.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            features.append(model(x)[0])
    model.train()
    return torch.cat(features)


def eval_logits(run: Run, features: torch.Tensor) -> torch.Tensor | None:
    """model.classifier's logits of some eval features (a whole set's, samples x classes, would not fit at 100,000 classes),
    None for the losses that never read them (CENTER_ACC_LOSSES)."""
    return run.model.classifier(features) if run.args.loss not in CENTER_ACC_LOSSES else None


@torch.no_grad()
def objective_stats(run: Run, features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The objective on evaluation features in chunks of --batch-size, so that pairwise terms have the train loss's scale."""
    objective, size = run.objective, run.args.batch_size
    sums = torch.zeros(4, device=features.device, dtype=torch.float64)
    for i in range(0, len(labels), size):
        loss, terms = objective(
            features[i : i + size], eval_logits(run, features[i : i + size]), labels[i : i + size]
        )
        sums += torch.stack(
            [loss] + [terms.get(t, loss.new_zeros(())) for t in TERMS]
        ).double() * len(labels[i : i + size])
    sums = (sums / len(labels)).tolist()
    return {"test_loss": sums[0], **{f"test_{t}": v for t, v in zip(TERMS, sums[1:])}}


@torch.no_grad()
def accuracy(run: Run, data: ImageData) -> tuple[float, torch.Tensor]:
    """The study's accuracy on `data`, with its features."""
    features, centers = embed(run, data), run.objective.centers
    predictions = [
        acc_predictions(run.args.loss, f, eval_logits(run, f), centers)
        for f in features.split(EVAL_BATCH)
    ]
    return (
        torch.cat(predictions) == data.labels.to(features.device)
    ).float().mean().item(), features


def epoch_row(run: Run, epoch: int, state: EpochState, seconds: float) -> tuple[dict, torch.Tensor]:
    """Evaluate after an epoch and assemble its metrics.csv row; returns the row and test features."""
    args, objective, test = run.args, run.objective, run.test
    test_acc, features = accuracy(run, test)
    labels = test.labels.to(features.device)
    stats = objective_stats(run, features, labels)
    centers = objective.centers.detach() if objective.centers is not None else None
    s, batches = state.loss_sums.tolist(), max(state.good_steps(), 1)
    row = {"epoch": epoch, "lr": run.optimizer.param_groups[0]["lr"], "train_loss": s[0] / batches}
    for i, t in enumerate(TERMS, start=1):
        row[f"train_{t}"] = s[i] / batches if t in objective.terms_used else None
        row[f"test_{t}"] = stats[f"test_{t}"] if t in objective.terms_used else None
    row.update(
        train_acc=int(state.correct) / (batches * args.batch_size),
        test_loss=stats["test_loss"],
        test_acc=test_acc,
    )
    row["ncm_acc"] = (
        (nearest_class_mean(features, state.class_sum, state.class_count) == labels)
        .float()
        .mean()
        .item()
    )
    row["center_acc"] = (
        (nearest(features, centers) == labels).float().mean().item()
        if centers is not None
        else None
    )
    row["val_acc"] = accuracy(run, run.val)[0] if run.val is not None else None
    row.update(class_geometry(features, labels))
    if run.unseen is not None:  # open set: retrieval among the classes never trained on
        unseen_features = embed(run, run.unseen)
        scores = retrieval_scores(unseen_features, run.unseen.labels.to(features.device))
        row.update({f"open_{name}": value for name, value in scores.items()})
    if epoch == args.epochs or (args.eval_every and epoch % args.eval_every == 0):
        train_features = embed(run, run.train)
        row.update(
            feature_metrics(
                features, labels, train_features, run.train.labels.to(features.device), args.seed
            )
        )
    row.update(bad_steps=int(state.bad_steps), seconds=seconds)
    return row, features


def run_summary(run: Run, data: Dataset) -> dict:
    """summary.json: settings (paths relative to the run folder), last epoch's metrics, best accuracy, speed, bad steps. `train_acc` is the last epoch's
    running accuracy on augmented batches; `clean_train_acc` the final model's on the plain train set (eval mode,
    the run's accuracy rule): with `acc`, the finished model's train/test gap."""
    args, history = run.args, run.history
    last, data_dir = history[-1], args.data_dir and str(Path(args.data_dir))

    def rel(path) -> str:  # to the run folder: a summary names no folder of the machine it ran on
        try:
            return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(run.dir))).as_posix()
        except ValueError:  # Windows: no relative path to another drive
            return Path(path).name

    return {
        **vars(args),
        "out": rel(args.out),
        "data_dir": rel(data_dir) if data_dir else None,
        "num_classes": len(data.classes),
        "train_size": len(data.train),
        "test_size": len(data.test),
        "augmentations": list(data.augmentations),
        "data_source": data.source.replace(str(data_dir), rel(data_dir))
        if data_dir
        else data.source,
        "data_files": [rel(f) for f in data.files],
        "acc": last["test_acc"],
        "best_acc": max(r["test_acc"] for r in history),
        "ncm_acc": last["ncm_acc"],
        "center_acc": last["center_acc"],
        "train_acc": last["train_acc"],
        "clean_train_acc": accuracy(run, run.train)[0],
        "epochs": len(history),
        "train_seconds": run.train_seconds,
        "samples_per_second": run.samples / max(run.train_seconds, 1e-9),
        "bad_steps": run.bad_steps,
        **{name: last[name] for name in (*FEATURE_METRICS, *GEOMETRY_METRICS)},
        **({name: last[name] for name in OPEN_SET_METRICS} if run.unseen is not None else {}),
        "classes": data.classes,
        **validation_summary(history),
        "device": str(run.device),
        "peak_gpu_memory_mb": torch.cuda.max_memory_allocated(run.device) / 2**20
        if run.device.type == "cuda"
        else None,
        "torch": torch.__version__,
    }


def validation_summary(history: list[dict]) -> dict:
    """Model selection on the held-out split: the epoch of best val_acc and the test accuracy then."""
    last = history[-1]["val_acc"]
    if last is None:
        return {}
    best = max(history, key=lambda r: r["val_acc"])
    return {
        "val_acc": last,
        "best_val_acc": best["val_acc"],
        "best_val_epoch": best["epoch"],
        "test_acc_at_best_val": best["test_acc"],
    }
