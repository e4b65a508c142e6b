"""Retrieval and clustering metrics, the study's alternative losses, validation split, TensorBoard."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import metrics  # noqa: E402
from datasets import ImageData, split_validation  # noqa: E402
from losses import CentersApartLoss, CenterSoftmaxLoss, Objective  # noqa: E402


def clusters(n_per_class: int = 40, classes: int = 5, spread: float = 0.05, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat(n_per_class)
    features = torch.eye(classes)[labels] * 4 + spread * torch.randn(len(labels), classes, generator=g)
    return features, labels


def test_perfect_clusters_score_one() -> None:
    features, labels = clusters()
    scores = metrics.feature_metrics(features, labels, features, labels)
    for name in ("knn1_acc", "knn10_acc", "precision_at_1", "map_at_r", "nmi", "ami"):
        assert scores[name] == pytest.approx(1.0), name
    assert scores["center_distance_ratio"] < 0.05


def test_shuffled_labels_score_near_chance() -> None:
    features, labels = clusters(n_per_class=100)
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    gallery, gallery_labels = clusters(n_per_class=100, seed=2)
    assert metrics.knn_accuracy(features, shuffled, gallery, gallery_labels, 10) == pytest.approx(0.2, abs=0.08)
    p1, map_r = metrics.leave_one_out_retrieval(features, shuffled)
    assert p1 == pytest.approx(0.2, abs=0.08) and map_r < 0.3
    nmi, ami = metrics.clustering_scores(features, shuffled)
    assert nmi < 0.05 and abs(ami) < 0.02
    assert metrics.center_distance_ratio(features, shuffled) > 2


@pytest.mark.parametrize("where", ["test", "train"])
def test_non_finite_features_give_nan_metrics_not_an_error(where: str) -> None:
    """An overflowing model's features (inf) make every metric NaN instead of crashing k-means."""
    labels = torch.arange(40) % 4
    features = {"test": torch.randn(40, 2), "train": torch.randn(40, 2)}
    features[where][3, 1] = float("inf")
    scores = metrics.feature_metrics(features["test"], labels, features["train"], labels)
    assert set(scores) == set(metrics.FEATURE_METRICS) and all(math.isnan(v) for v in scores.values())
    finite = metrics.feature_metrics(torch.randn(40, 2), labels, torch.randn(40, 2), labels)
    assert not any(math.isnan(v) for v in finite.values())


def test_map_at_r_hand_computed() -> None:
    # 1-D points: class 0 at 0, 1, 10; class 1 at 2.5, 11, 12.5 (no ties).
    features = torch.tensor([[0.0], [1.0], [10.0], [2.5], [11.0], [12.5]])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    # R = 2 for every query. Neighbours (nearest first, query left out):
    # 0: 1(0) 2(1)        -> rel 1,0 -> AP = (1/2)(1/1) = 0.5
    # 1: 0(0) 2(1)        -> 1,0     -> 0.5
    # 10: 11(1) 12(1)     -> 0,0     -> 0
    # 2: 1(0) 0(0)        -> 0,0     -> 0
    # 11: 10(0) 12(1)     -> 0,1     -> (1/2)(1/2) = 0.25
    # 12: 11(1) 10(0)     -> 1,0     -> 0.5
    p1, map_r = metrics.leave_one_out_retrieval(features, labels)
    assert p1 == pytest.approx(3 / 6)
    assert map_r == pytest.approx((0.5 + 0.5 + 0 + 0 + 0.25 + 0.5) / 6)


def test_knn_majority_and_tie_break() -> None:
    gallery = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    gallery_labels = torch.tensor([1, 0, 0, 1])
    query = torch.tensor([[0.1], [9.0]])
    # k=3: neighbours of 0.1 are labels 1, 0, 0 -> 0; of 9.0: 1, 0, 0 -> 0.
    assert metrics.knn_accuracy(query, torch.tensor([0, 0]), gallery, gallery_labels, 3) == 1.0
    # k=2: a 1-1 tie goes to the nearer neighbour: 0.1 -> label 1.
    assert metrics.knn_accuracy(query[:1], torch.tensor([1]), gallery, gallery_labels, 2) == 1.0


def test_chunked_search_matches_unchunked(monkeypatch) -> None:
    features, labels = clusters(n_per_class=30, spread=2.0)
    full = metrics.leave_one_out_retrieval(features, labels), metrics.knn_accuracy(features, labels, features, labels, 10)
    monkeypatch.setattr(metrics, "CHUNK", 7)
    (p1, map_r), knn = metrics.leave_one_out_retrieval(features, labels), metrics.knn_accuracy(features, labels, features, labels, 10)
    assert p1 == full[0][0] and knn == full[1]
    assert map_r == pytest.approx(full[0][1], rel=1e-6)


@pytest.mark.parametrize("make", [lambda: CentersApartLoss(3, 2, alpha=0.1), lambda: CenterSoftmaxLoss(3, 2)])
def test_alternative_losses_finite_and_decreasing(make) -> None:
    torch.manual_seed(0)
    loss_fn = make()
    labels = torch.arange(3).repeat(10)
    inputs = torch.eye(3)[labels] + 0.1 * torch.randn(30, 3)
    embed = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD([*embed.parameters(), *loss_fn.parameters()], lr=0.05)
    values = []
    for _ in range(60):
        loss = loss_fn(embed(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        grads = [p.grad for p in [*embed.parameters(), *loss_fn.parameters()]]
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
        optimizer.step()
        values.append(loss.item())
    assert values[-1] < values[0] - 0.1


def test_centers_apart_formula() -> None:
    loss_fn = CentersApartLoss(2, 1, weight_intra=1.0, weight_inter=0.5, alpha=0.5)
    with torch.no_grad():
        loss_fn.centers.copy_(torch.tensor([[0.0], [2.0]]))
    features, labels = torch.tensor([[1.0], [2.0]]), torch.tensor([0, 1])
    intra = (math.exp(0.5 * 1.0) + math.exp(0.0)) / 2
    inter = -(2 * math.log1p(4.0)) / 2
    assert loss_fn(features, labels).item() == pytest.approx(intra + 0.5 * inter, rel=1e-6)
    objective = Objective("centers-apart", 2, 1, weight_inter=0.5, alpha=0.5)
    assert objective.terms_used == ("intra", "inter")


def test_validation_split_disjoint_and_fixed_by_seed() -> None:
    data = ImageData(torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1), torch.arange(100) % 10)
    train, val = split_validation(data, 0.2, seed=3)
    assert len(val) == 20 and len(train) == 80
    ids_train, ids_val = set(train.images.flatten().tolist()), set(val.images.flatten().tolist())
    assert not ids_train & ids_val and len(ids_train | ids_val) == 100
    assert torch.equal(split_validation(data, 0.2, seed=3)[1].images, val.images)
    assert not torch.equal(split_validation(data, 0.2, seed=4)[1].images, val.images)


def test_run_writes_metrics_validation_and_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")  # listed in requirements.txt, so CI always runs this
    args = ["--dataset", "digits", "--train-samples", "200", "--batch-size", "40", "--epochs", "2", "--model", "lenet++"]
    args += ["--loss", "cent", "--val-fraction", "0.25", "--tensorboard", "--eval-every", "1", "--out", str(tmp_path)]
    result = subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "cent-digits-feat=2"
    summary = json.loads((run_dir / "summary.json").read_text())
    for name in ("knn1_acc", "knn10_acc", "precision_at_1", "map_at_r", "nmi", "ami", "center_distance_ratio", "val_acc", "best_val_epoch"):
        assert name in summary and summary[name] is not None, name
    assert summary["train_size"] == 150  # 200 - 25% held out
    assert 0 <= summary["map_at_r"] <= 1 and 0 <= summary["knn1_acc"] <= 1
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert (run_dir / "tensorboard" / "projector_config.pbtxt").is_file()
