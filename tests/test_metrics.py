"""Retrieval and clustering metrics, the study's alternative losses, validation split, TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import reference_retrieval, write_image_tree
from sklearn.metrics import adjusted_mutual_info_score

import metrics
from datasets import ImageData, split_validation
from losses import CentersApartLoss, CenterSoftmaxLoss, Objective
from main import main


def clusters(n_per_class=40, classes=5, spread=0.05, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat(n_per_class)
    noise = spread * torch.randn(len(labels), classes, generator=g)
    return torch.eye(classes)[labels] * 4 + noise, labels


def test_perfect_clusters_score_one() -> None:
    features, labels = clusters()
    scores = metrics.feature_metrics(features, labels, features, labels)
    names = ("knn1_acc", "knn10_acc", "precision_at_1", "map_at_r", "nmi", "ami")
    assert {k: scores[k] for k in names} == pytest.approx(dict.fromkeys(names, 1.0))
    assert scores["center_distance_ratio"] < 0.05


def test_shuffled_labels_score_near_chance() -> None:
    features, labels = clusters(n_per_class=100)
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    gallery, gallery_labels = clusters(n_per_class=100, seed=2)
    knn = metrics.knn_accuracy(features, shuffled, gallery, gallery_labels, 10)
    assert knn == pytest.approx(0.2, abs=0.08)
    scores = metrics.retrieval_scores(features, shuffled)
    p1, map_r = scores["precision_at_1"], scores["map_at_r"]
    assert p1 == pytest.approx(0.2, abs=0.08) and map_r < 0.3
    nmi, ami = metrics.clustering_scores(features, shuffled)
    assert nmi < 0.05 and abs(ami) < 0.02
    assert metrics.center_distance_ratio(features, shuffled) > 2


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["test", "train"])
def test_non_finite_features_give_nan_metrics_not_an_error(where: str, value: float) -> None:
    """Overflowed features (inf or NaN) in the test set or the k-NN gallery make every metric NaN,
    and retrieval and geometry of them too: k-means crashed, pml raised a ValueError on NaN and
    ranked neighbours by NaN distances around an inf."""
    g, labels = torch.Generator().manual_seed(0), torch.arange(40) % 4
    features = {"test": torch.randn(40, 2, generator=g), "train": torch.randn(40, 2, generator=g)}
    finite = metrics.feature_metrics(features["test"], labels, features["train"], labels)
    assert not any(math.isnan(v) for v in finite.values())
    features[where][3, 1] = value
    results = [metrics.feature_metrics(features["test"], labels, features["train"], labels)]
    results += [
        f(features[where], labels) for f in (metrics.retrieval_scores, metrics.class_geometry)
    ]
    names = (metrics.FEATURE_METRICS, metrics.RETRIEVAL_METRICS, metrics.GEOMETRY_METRICS)
    assert [tuple(scores) for scores in results] == list(names)
    assert all(math.isnan(v) for scores in results for v in scores.values())


# Neighbours of each query, nearest first (the query left out): relevance and AP over the R hits;
# R-precision: the share of hits among the R nearest.
# 1) R = 2 for all: 0 -> 1,10: AP 1/2; 1 -> 0,10: 1/2; 10 -> 11,12.5: 0; 2.5 -> 1,0: 0;
#    11 -> 10,12.5: (1/2)(1/2); 12.5 -> 11,10: 1/2.
# 2) Class 0 R = 2, class 1 R = 1, class 2 R = 0 (skipped): 0 -> 1,2.5: 1/2; 1 -> 0,2.5: 1/2;
#    10 -> 3,2.5: 0; 2.5 -> 3: 1 (with R = 2 it would be 1/2); 3 -> 2.5: 1.
# 3) Ties, R = 1: 0 (a) has 1 (b) and 2 (a) at distance 1, index 1 first: miss; 1 (b) -> 2 (a) at
#    0: miss; 2 (a) -> 1 (b) at 0: miss; 3 (b) has 1 (b) and 2 (a) at 4, index 1 first: hit.
# 4) No query has a classmate: None, not an error.
@pytest.mark.parametrize(
    "points, labels, p1, r_precision, map_r",
    [
        ([0, 1, 10, 2.5, 11, 12.5], [0, 0, 0, 1, 1, 1], 3 / 6, 2 / 6, (0.5 + 0.5 + 0.25 + 0.5) / 6),
        ([0, 1, 10, 2.5, 3, 20], [0, 0, 0, 1, 1, 2], 4 / 5, 3 / 5, (0.5 + 0.5 + 1 + 1) / 5),
        ([0, 1, 1, 3], [0, 1, 0, 1], 1 / 4, 1 / 4, 1 / 4),
        ([0, 1, 2, 3], [0, 1, 2, 3], None, None, None),
    ],
)
def test_retrieval_hand_computed(points, labels, p1, r_precision, map_r) -> None:
    scores = metrics.retrieval_scores(torch.tensor(points)[:, None], torch.tensor(labels))
    assert scores == pytest.approx(dict(zip(metrics.RETRIEVAL_METRICS, (p1, r_precision, map_r))))


def test_retrieval_matches_loops_on_unbalanced_classes_with_ties(monkeypatch) -> None:
    """R = 17, 11, 5, 2 and 0 on a 3 x 3 grid of points: many neighbours tie, so the scores depend
    on the tie rule (index order), which both sides follow; chunks cut through the classes."""
    g = torch.Generator().manual_seed(5)
    labels = torch.tensor([0] * 18 + [1] * 12 + [2] * 6 + [3] * 3 + [4])
    features = torch.randint(0, 3, (40, 2), generator=g).float()
    expected = reference_retrieval(features, labels)
    monkeypatch.setattr(metrics, "CHUNK", 7)
    assert metrics.retrieval_scores(features, labels) == pytest.approx(expected, rel=1e-6)


def reference_knn(query, query_labels, gallery, gallery_labels, k: int) -> float:
    """Plain loops: majority of the k (at most the gallery) nearest, ties to the smaller sum of
    ranks, then to the smaller label."""
    k = min(k, len(gallery))
    correct = 0
    for q, truth in zip(query.double().tolist(), query_labels.tolist()):
        order = sorted(
            range(len(gallery)),
            key=lambda j: sum((a - b) ** 2 for a, b in zip(q, gallery[j].double().tolist())),
        )
        ranks: dict[int, list[int]] = {}
        for rank, j in enumerate(order[:k]):
            ranks.setdefault(int(gallery_labels[j]), []).append(rank)
        best = min(ranks, key=lambda label: (-len(ranks[label]), sum(ranks[label]), label))
        correct += best == truth
    return correct / len(query)


@pytest.mark.parametrize("k", [1, 4, 10, 50])
def test_knn_matches_loops_with_queries_apart_from_the_gallery(monkeypatch, k: int) -> None:
    """Queries are not gallery points (no zero distance to find itself), classes overlap, k up to
    beyond the gallery's 30 points; chunked like the 10,000-query test set."""
    g = torch.Generator().manual_seed(7)
    gallery_labels, query_labels = torch.arange(30) % 4, torch.randint(0, 4, (23,), generator=g)
    gallery = torch.randn(30, 2, generator=g) + gallery_labels[:, None] * 0.8
    query = torch.randn(23, 2, generator=g) + query_labels[:, None] * 0.8
    expected = reference_knn(query, query_labels, gallery, gallery_labels, k)
    assert 0 < expected < 1  # neither trivial nor hopeless
    monkeypatch.setattr(metrics, "CHUNK", 6)
    knn = metrics.knn_accuracy(query, query_labels, gallery, gallery_labels, k)
    assert knn == pytest.approx(expected)


def test_knn_hand_computed_with_a_separate_gallery() -> None:
    gallery = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]])
    gallery_labels = torch.tensor([0, 0, 1, 1, 1, 0])
    query = torch.tensor([[0.4], [10.6], [5.2]])

    def knn(labels, k, n=3):
        return metrics.knn_accuracy(query[:n], torch.tensor(labels), gallery, gallery_labels, k)

    # k=1: 0.4 -> 0 (label 0), 10.6 -> 11 (1), 5.2 -> 2 (1).
    # k=3: 0.4 -> 0,1,2 -> 0; 10.6 -> 11,10,12 -> 1; 5.2 -> 2,1,10 -> 1.
    assert knn([0, 1, 1], 1) == 1.0 and knn([0, 1, 0], 3) == pytest.approx(2 / 3)
    # k=6, the whole gallery, 3 votes each: 0.4 ranks label 0 at 0, 1, 5 (sum 6), label 1 at 2, 3, 4.
    assert knn([0], 6, n=1) == 1.0
    # k beyond the gallery (a tiny --train-samples) is the whole gallery, not an error.
    assert [knn([0, 1, 0], k) for k in (7, 10, 100)] == [knn([0, 1, 0], 6)] * 3


@pytest.mark.parametrize(
    "labels, winner",
    [
        ([1, 0, 0], 0),  # k=3: the majority, though label 1 is nearest
        ([1, 0], 1),  # k=2: a 1-1 tie goes to the smaller rank sum, the nearer neighbour
        # k=5, ranks 0..4. Labels 0 and 1 tie at 2 votes: label 0 has the nearest neighbour (rank 0) and
        # the smaller index, but its ranks sum to 4 against label 1's 3, so label 1 wins.
        ([0, 1, 1, 2, 0], 1),
        # Labels 0 and 1 swapped: the nearest-member rule now picks 1, ours 0 (as does the smaller label).
        ([1, 0, 0, 2, 1], 0),
        # k=4, labels 0 and 1 tie at 2 votes and at rank sum 3: the smaller label wins although
        # label 1 holds the nearest neighbour.
        ([1, 0, 0, 1], 0),
    ],
)
def test_knn_tie_rule_where_rules_differ(labels: list[int], winner: int) -> None:
    gallery = torch.arange(1, len(labels) + 1.0)[:, None]  # rank r at distance r + 1
    gallery_labels, query = torch.tensor(labels), torch.zeros(1, 1)
    k = len(labels)
    assert metrics.knn_accuracy(query, torch.tensor([winner]), gallery, gallery_labels, k) == 1.0
    assert reference_knn(query, torch.tensor([winner]), gallery, gallery_labels, k) == 1.0


def test_retrieval_over_many_classes_counts_labels_a_chunk_of_queries_at_a_time(monkeypatch):
    """pml's label counts (distinct query labels x references: 8 GB at 20,000 classes) come CHUNK
    queries at a time, and the scores equal the loops' with many exactly tied neighbours."""
    import pytorch_metric_learning.utils.accuracy_calculator as pml

    seen, count = [], pml.get_label_match_counts
    record = lambda q, r, fn: seen.append((len(q), len(r))) or count(q, r, fn)  # noqa: E731
    monkeypatch.setattr(pml, "get_label_match_counts", record)
    g = torch.Generator().manual_seed(3)
    labels = torch.cat([torch.arange(120).repeat(2), torch.arange(120, 160)])  # 120 pairs, 40 alone
    labels = labels[torch.randperm(len(labels), generator=g)]
    features = torch.randint(0, 4, (len(labels), 3), generator=g).float()
    monkeypatch.setattr(metrics, "CHUNK", 16)
    assert metrics.retrieval_scores(features, labels) == pytest.approx(
        reference_retrieval(features, labels), rel=1e-9
    )
    assert len(seen) == 280 // 16 + 1 and all(q <= 16 and r == 280 for q, r in seen)


def test_clustering_scores_stop_above_cluster_classes(monkeypatch) -> None:
    """Above CLUSTER_CLASSES classes (k-means: hours at 100,000) NMI and AMI are None, unscored."""
    features, labels = clusters(n_per_class=10, classes=4)
    monkeypatch.setattr(metrics, "CLUSTER_CLASSES", 4)
    assert metrics.clustering_scores(features, labels) == pytest.approx((1.0, 1.0))
    monkeypatch.setattr(metrics, "CLUSTER_CLASSES", 3)
    monkeypatch.setattr("sklearn.cluster.KMeans.fit_predict", lambda *a, **k: pytest.fail("ran"))
    assert metrics.clustering_scores(features, labels) == (None, None)


def test_clustering_scores_on_collapsed_and_wide_features() -> None:
    """k-means copes with collapsed features (all equal, or fewer distinct points than classes) and
    with very wide ones (--feat-dim 100000 crashed the old k-means after epoch 1)."""
    labels = torch.arange(40) % 4
    assert metrics.clustering_scores(torch.full((40, 2), 3.0), labels) == pytest.approx((0, 0))
    halves = (labels[:, None] % 2).float().expand(40, 2).contiguous()  # 2 points for 4 classes
    nmi, ami = metrics.clustering_scores(halves, labels)
    # The two halves are found: each cluster holds 2 whole classes, NMI = 2 H(half) / (H + H(half)).
    assert nmi == pytest.approx(2 * math.log(2) / (math.log(4) + math.log(2)))
    assert ami == pytest.approx(adjusted_mutual_info_score(labels, labels % 2))
    wide = torch.zeros(40, 100_000)
    wide[torch.arange(40), labels * 1000] = 5.0  # one far-apart axis per class
    assert metrics.clustering_scores(wide, labels) == pytest.approx((1.0, 1.0))


@pytest.mark.parametrize(
    "make", [lambda: CentersApartLoss(3, 2, alpha=0.1), lambda: CenterSoftmaxLoss(3, 2)]
)
def test_alternative_losses_finite_and_decreasing(make) -> None:
    torch.manual_seed(0)
    loss_fn = make()
    labels = torch.arange(3).repeat(10)
    inputs = torch.eye(3)[labels] + 0.1 * torch.randn(30, 3)
    embed = torch.nn.Linear(3, 2)
    params = [*embed.parameters(), *loss_fn.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.05)
    values = []
    for _ in range(60):
        loss = loss_fn(embed(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in params)
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
    assert Objective("centers-apart", 2, 1).terms_used == ("intra", "inter")


def test_validation_split_disjoint_and_fixed_by_seed() -> None:
    ids = torch.arange(100)
    data = ImageData(ids.to(torch.uint8).view(100, 1, 1, 1), ids % 10)
    train, val = split_validation(data, 0.2, seed=3)
    assert len(val) == 20 and len(train) == 80
    ids_train, ids_val = set(train.images.flatten().tolist()), set(val.images.flatten().tolist())
    assert not ids_train & ids_val and len(ids_train | ids_val) == 100
    assert torch.equal(split_validation(data, 0.2, seed=3)[1].images, val.images)
    assert not torch.equal(split_validation(data, 0.2, seed=4)[1].images, val.images)


def test_run_writes_metrics_validation_and_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")  # listed in requirements.txt, so CI always runs this
    args = "--dataset digits --train-samples 200 --batch-size 40 --epochs 2 --model lenet++".split()
    args += "--loss cent --val-fraction 0.25 --tensorboard --eval-every 1".split()
    assert main([*args, "--out", str(tmp_path)]) == 0
    run_dir = tmp_path / "cent-digits-feat=2"
    summary = json.loads((run_dir / "summary.json").read_text())
    for name in (*metrics.FEATURE_METRICS, "val_acc", "best_val_epoch"):
        assert summary[name] is not None, name
    assert summary["train_size"] == 150  # 200 - 25% held out
    with np.load(run_dir / "frames" / "test" / "epoch_002.npz") as frame:  # the features measured
        want = reference_retrieval(*(torch.from_numpy(frame[k]) for k in ("features", "labels")))
        assert summary["test_size"] == len(frame["labels"])
    assert summary["map_at_r"] == pytest.approx(want["map_at_r"], rel=1e-5)
    hits = summary["knn1_acc"] * summary["test_size"]  # a share of the test images
    assert hits == pytest.approx(round(hits), abs=1e-6)
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert (run_dir / "tensorboard" / "projector_config.pbtxt").is_file()


def test_one_test_image_a_class_or_one_class_gives_none_not_an_error() -> None:
    """One test image a class: MAP@R, P@1, NMI and AMI are None (an IndexError before); k-NN and the
    ratio are scored. One class: no ratio (was NaN), no NMI (was a meaningless 1); retrieval is."""
    test, test_labels = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]]), torch.tensor([0, 1, 2])
    train_labels = torch.arange(3).repeat(4)
    g = torch.Generator().manual_seed(0)
    train = test[train_labels] + 0.1 * torch.randn(12, 2, generator=g)
    scores = metrics.feature_metrics(test, test_labels, train, train_labels)
    assert list(scores) == list(metrics.FEATURE_METRICS)
    assert [scores[name] for name in ("precision_at_1", "map_at_r", "nmi", "ami")] == [None] * 4
    assert [scores[k] for k in ("knn1_acc", "knn10_acc", "center_distance_ratio")] == [1, 1, 0]
    one = torch.zeros(12, dtype=torch.long)
    scores = metrics.feature_metrics(train, one, train, one)
    assert [scores[k] for k in ("center_distance_ratio", "nmi", "ami")] == [None] * 3
    assert [scores[k] for k in ("precision_at_1", "map_at_r", "knn1_acc")] == [1.0] * 3


def test_run_whose_test_classes_have_one_image_each_finishes(tmp_path: Path) -> None:
    """A run with one test image a class reaches summary.json, with the metrics it cannot give as null
    (they raised IndexError after training)."""
    data = write_image_tree(tmp_path / "tree", per_class=(4, 1))
    args = "--dataset folder --model lenet++ --epochs 1 --batch-size 4 --no-plots".split()
    assert main([*args, "--data-dir", str(data), "--out", str(tmp_path / "runs")]) == 0
    summary = json.loads((tmp_path / "runs/standalone-folder-feat=2/summary.json").read_text())
    assert summary["test_size"] == 3 and summary["map_at_r"] is summary["precision_at_1"] is None
    assert summary["knn1_acc"] * 3 == pytest.approx(round(summary["knn1_acc"] * 3))  # of 3 images


def test_class_geometry_hand_computed() -> None:
    """Each point 2 from its class mean; the means (2, 0), (10, 2) and (0, 8) are sqrt(68), sqrt(68)
    and sqrt(136) apart; labels 0, 2, 5: the absent ones have no mean (a zero mean changed the
    ratio) and no cluster (k-means looks for 3)."""
    features = torch.tensor([[0.0, 0], [4, 0], [10, 0], [10, 4], [0, 6], [0, 10]])
    labels = torch.tensor([0, 0, 2, 2, 5, 5])
    low, mean_between = math.sqrt(68), (2 * math.sqrt(68) + math.sqrt(136)) / 3
    expected = dict(intra_distance=2.0, min_center_gap=low, mean_center_gap=mean_between)
    expected |= dict(min_gap_ratio=low / 2, mean_gap_ratio=mean_between / 2)
    expected["feature_norm"] = (0 + 4 + 10 + math.sqrt(116) + 6 + 10) / 6

    geometry = metrics.class_geometry(features, labels)
    assert list(geometry) == list(metrics.GEOMETRY_METRICS)
    assert geometry == pytest.approx(expected, rel=1e-6)
    ratio = metrics.center_distance_ratio(features, labels)
    assert ratio == pytest.approx(2 / mean_between, rel=1e-6)
    assert metrics.clustering_scores(features, labels) == pytest.approx((1.0, 1.0))


def test_class_geometry_of_one_class_or_collapsed_classes() -> None:
    one = metrics.class_geometry(torch.tensor([[3.0, 4.0], [3.0, 4.0]]), torch.tensor([1, 1]))
    gaps = dict.fromkeys(metrics.GEOMETRY_METRICS[1:5])
    assert one == {"intra_distance": 0.0, "feature_norm": 5.0} | gaps
    collapsed = metrics.class_geometry(torch.tensor([[0.0], [0.0], [3.0]]), torch.tensor([0, 0, 1]))
    gaps = [collapsed[k] for k in ("min_center_gap", "min_gap_ratio", "mean_gap_ratio")]
    assert gaps == [3, None, None]
