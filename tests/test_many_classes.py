"""Center loss at face-recognition scale: center updates that touch only the batch's rows, chunked
nearest-center evaluation, and a whole main.py run on 10,000 classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import evaluation
import main
from datasets import Dataset, ImageData
from losses import CenterRows, center_rows_grad, center_sgd_step, intra_loss, paper_center_update, rows_grad_norm
from utils import CHUNK_BYTES


def batch(num_classes: int = 6, feat_dim: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([4, 1, 4, 0, 4, 1, 2])  # duplicates; classes 3 and 5 absent
    return torch.randn(len(labels), feat_dim, generator=g), torch.randn(num_classes, feat_dim, generator=g), labels


def test_center_rows_grad_are_the_dense_gradient_rows_and_its_norm() -> None:
    features, centers, labels = batch()
    dense = centers.clone().requires_grad_()
    intra_loss(features, dense, labels).backward()
    sparse = centers.clone().requires_grad_()
    intra_loss(features, sparse, labels, sparse=True).backward()
    assert sparse.grad.is_sparse
    grad = center_rows_grad(sparse)
    assert sparse.grad is None and torch.equal(grad.labels, labels) and grad.counts.tolist() == [3, 2, 3, 1, 3, 2, 1]
    torch.testing.assert_close(grad.rows, dense.grad[labels])
    torch.testing.assert_close(rows_grad_norm(grad), dense.grad.norm())


def test_center_sgd_step_is_torch_sgd_on_present_classes_and_lazy_on_absent_ones() -> None:
    """Two steps of torch.optim.SGD (momentum 0.9) on the dense gradient against center_sgd_step: the
    first batch holds classes {0, 1, 2, 4}, the second only {1}. After step two, classes present in
    every batch agree with SGD; class 4 keeps its step-one value, where dense SGD let it coast by
    momentum * b. Classes never seen stay at their initial value in both."""
    features, centers, labels = batch()
    second = (features[:2], torch.tensor([1, 1]))
    dense = centers.clone().requires_grad_()
    sgd = torch.optim.SGD([dense], lr=0.1, momentum=0.9)
    lazy, buffer = centers.clone().requires_grad_(), torch.zeros_like(centers)
    after_first = None
    for x, y in ((features, labels), second):
        sgd.zero_grad()
        intra_loss(x, dense, y).backward()
        sgd.step()
        intra_loss(x, lazy, y, sparse=True).backward()
        assert center_sgd_step(lazy.data, buffer, center_rows_grad(lazy), lr=0.1, momentum=0.9)
        after_first = dense.detach().clone() if after_first is None else after_first
    torch.testing.assert_close(lazy.data[1], dense.data[1])
    torch.testing.assert_close(lazy.data[4], after_first[4])
    assert not torch.allclose(dense.data[4], after_first[4])  # dense SGD's momentum moved the absent class
    assert torch.equal(lazy.data[[3, 5]], centers[[3, 5]]) and torch.equal(dense.data[[3, 5]], centers[[3, 5]])
    assert torch.equal(buffer[[3, 5]], torch.zeros(2, 3))


@pytest.mark.parametrize("update", ["paper", "sgd"])
def test_center_updates_do_nothing_unless_finite(update: str) -> None:
    """With finite False, or rows that would not be finite, the centers and the momentum stay as they were."""
    features, centers, labels = batch()
    for finite, x in ((torch.tensor(False), features), (torch.tensor(True), features * float("inf"))):
        c, buffer = centers.clone(), torch.ones_like(centers)
        if update == "paper":
            ok = paper_center_update(c, x, labels, 0.5, finite)
        else:
            rows = torch.ones(len(labels), 3) * x.sum()
            ok = center_sgd_step(c, buffer, CenterRows(labels, rows, torch.ones(len(labels))), 0.1, 0.9, finite)
        assert bool(ok) == bool(torch.isfinite(x).all())
        assert torch.equal(c, centers) and torch.equal(buffer, torch.ones_like(centers))


def test_nearest_over_100000_centers_keeps_each_chunk_of_distances_within_64_mib(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(100_000, 8, generator=g)
    picked = torch.randint(0, 100_000, (600,), generator=g)
    features = centers[picked] + 0.001 * torch.randn(600, 8, generator=g)
    sizes = []
    distances = evaluation.squared_distances
    monkeypatch.setattr(evaluation, "squared_distances", lambda a, b: sizes.append(len(a) * len(b) * 4) or distances(a, b))
    assert torch.equal(evaluation.nearest(features, centers), picked)
    assert len(sizes) > 1 and max(sizes) <= CHUNK_BYTES
    exclude = torch.zeros(100_000, dtype=torch.bool)
    exclude[picked[:5]] = True  # an excluded (never seen) class is not predicted: the sample goes elsewhere
    assert not (evaluation.nearest(features[:5], centers, exclude) == picked[:5]).any()


def many_class_data(num_classes: int = 10_000, per_class: int = 2, test_size: int = 1000) -> Dataset:
    """8x8 grey images, `per_class` a class, shuffled (--train-samples then takes a mix of classes)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(num_classes).repeat(per_class)[torch.randperm(num_classes * per_class, generator=g)]
    images = torch.randint(0, 256, (len(labels), 1, 8, 8), generator=g, dtype=torch.uint8)
    test_labels = torch.randint(0, num_classes, (test_size,), generator=g)
    test_images = torch.randint(0, 256, (test_size, 1, 8, 8), generator=g, dtype=torch.uint8)
    classes = [f"id{k}" for k in range(num_classes)]
    return Dataset("faces", ImageData(images, labels), ImageData(test_images, test_labels), classes, (), "synthetic")


@pytest.mark.parametrize("center_update", ["sgd", "paper"])
def test_main_trains_and_evaluates_10000_classes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, center_update: str) -> None:
    """A whole main.py run (2 epochs of 4 steps, 2-D features) on 10,000 classes: nearest-center and
    nearest-class-mean accuracies, retrieval metrics, both frames per epoch and the GIFs."""
    monkeypatch.setattr(main, "load_dataset", lambda *a, **k: many_class_data())
    flags = ["--loss", "standalone", "--feat-dim", "2", "--epochs", "2", "--batch-size", "64", "--train-samples", "256"]
    flags += ["--center-update", center_update, "--out", str(tmp_path), "--name", "faces", "--device", "cpu"]
    assert main.main(flags) == 0
    summary = json.loads((tmp_path / "faces" / "summary.json").read_text())
    assert summary["num_classes"] == 10_000 and summary["epochs"] == 2
    assert 0 <= summary["acc"] <= 1 and 0 <= summary["ncm_acc"] <= 1 and summary["center_acc"] == summary["acc"]
    assert summary["center_distance_ratio"] > 0 and summary["knn1_acc"] is not None
    frames = sorted(p.name for p in (tmp_path / "faces" / "frames").glob("*/epoch_*.png"))
    assert frames == ["epoch_001.png", "epoch_001.png", "epoch_002.png", "epoch_002.png"]
    assert sorted(p.name for p in (tmp_path / "faces").glob("*.gif"))
