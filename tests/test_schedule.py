"""The study's lr schedule on test accuracies that runs measured (results/questions/q2, MNIST 2-D, 3 epochs)."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, metrics_without_seconds

from config import parse_args
from training import make_scheduler

MEASURED = REPO / "results" / "questions" / "q2"


def cut_epochs(accuracies: list[float]) -> tuple[list[int], float]:
    """Epochs whose rows train with a newly cut lr when the schedule steps on `accuracies` after
    each epoch, as main.py does; and the lr of epoch 100."""
    args = parse_args(["--dataset", "mnist"])
    params = [torch.zeros(1, requires_grad=True)]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum)

    scheduler = make_scheduler(optimizer, args)
    lrs = []
    for acc in accuracies:
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(acc)
    return [epoch for epoch in range(2, len(lrs) + 1) if lrs[epoch - 1] < lrs[epoch - 2]], lrs[-1]


@pytest.mark.parametrize("step", [0.0003, 0.0, -0.002])  # epochs 4-100 rise, stay, fall
# cent's epoch 1 (0.597) is beaten by 10% at epoch 2 (0.942)
@pytest.mark.parametrize("loss, first_cut", [("standalone", 13), ("xent", 13), ("cent", 14)])
def test_schedule_on_measured_accuracies(loss: str, first_cut: int, step: float) -> None:
    """Epochs 1-3 are measured; epochs 4-100 are made up here (the last measured accuracy plus `step`
    an epoch): the relative threshold 0.1 asks for acc > best * 1.1, which nothing beats once the best
    is above 1 / 1.1 ~ 0.91, so from the first epoch past 0.91 on, the lr is cut x0.2 every 11 epochs
    whatever the accuracy does."""
    rows = metrics_without_seconds(MEASURED / f"{loss}-mnist-feat=2")
    accuracies = [float(row["test_acc"]) for row in rows]
    assert len(accuracies) == 3
    accuracies += [min(accuracies[-1] + step * epoch, 0.999) for epoch in range(1, 98)]
    cuts, last_lr = cut_epochs(accuracies)
    assert cuts == list(range(first_cut, 101, 11))
    assert last_lr == pytest.approx(0.01 * 0.2 ** len(cuts))


def test_schedule_waits_while_the_accuracy_rises_by_10_percent() -> None:
    """Below 0.91 an epoch that beats the best by 10% resets the wait: a run starting lower (as on
    Fashion-MNIST or CIFAR-10) has its first cut at the 12th epoch after its last such epoch."""
    # Better by 10% at epochs 2, 3, 4 and 7 (0.70 > 0.56 * 1.1).
    accuracies = [0.30, 0.40, 0.50, 0.56, 0.60, 0.61, 0.70] + [0.75] * 93
    cuts, _ = cut_epochs(accuracies)
    assert cuts[:2] == [19, 30]  # 12 epochs after the last better one, as 13 after epoch 1
