"""The open-set split (--train-classes), retrieval against a plain-loop reference with ties, and the
class geometry recorded each epoch (more geometry cases in test_metrics.py, its picture in test_visualize.py)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY, reference_retrieval, run_main, stderr_error_line

import metrics
from datasets import Dataset, ImageData, open_set_split, parse_class_list

FASHION = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0-4", [0, 1, 2, 3, 4]),
        ("5,0,7", [0, 5, 7]),
        ("trouser, BAG", [1, 8]),
        ("T-shirt/top,2-3,Ankle boot", [0, 2, 3, 9]),
    ],
)
def test_class_lists_by_index_range_and_name(spec: str, expected: list[int]) -> None:
    assert parse_class_list(spec, FASHION) == expected


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("", "empty entry"),
        ("0,,1", "empty entry"),
        ("0,Sock", "no class 'Sock'"),
        ("0,12", "class index 12 is out of range"),
        ("4-0", "the range 4-0 is reversed"),
        ("0-3,2", "class 2 (Pullover) is named twice"),
        ("Bag,8", "class 8 (Bag) is named twice"),
        ("3", "at least 2 classes"),
        ("0-9", "names every class"),
    ],
)
def test_bad_class_lists_are_refused(spec: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        parse_class_list(spec, FASHION)


def test_open_set_split_keeps_seen_classes_and_relabels_both_sides() -> None:
    labels = torch.tensor([0, 1, 2, 3, 4, 2, 4, 0])
    images = (
        labels.to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    )  # each image shows its label
    data = Dataset(
        "toy",
        ImageData(images, labels),
        ImageData(images.flip(0), labels.flip(0)),
        list("abcde"),
        (),
        "memory",
    )
    closed, unseen = open_set_split(data, [1, 3, 4])
    assert closed.classes == ["b", "d", "e"]
    assert closed.train.labels.tolist() == [0, 1, 2, 2]
    assert closed.train.images[:, 0, 0, 0].tolist() == [1, 3, 4, 4]
    assert closed.test.labels.tolist() == [2, 2, 1, 0]
    assert unseen.labels.tolist() == [
        0,
        1,
        1,
        0,
    ]  # test images of a (0) and c (1), in the test set's order
    assert unseen.images[:, 0, 0, 0].tolist() == [0, 2, 2, 0]


def test_retrieval_matches_loops_with_ties(monkeypatch) -> None:
    # Integer points on a small grid: many neighbours at exactly equal distances, so the answer
    # depends on the tie rule (index order), which both sides follow.
    g = torch.Generator().manual_seed(3)
    features = torch.randint(0, 3, (40, 2), generator=g).float()
    labels = torch.randint(0, 4, (40,), generator=g)
    labels[-1] = 4  # a class of one: skipped as a query
    expected = reference_retrieval(features, labels)
    monkeypatch.setattr(metrics, "CHUNK", 7)  # chunks cut through the queries
    scores = metrics.retrieval_scores(features, labels)
    assert scores == pytest.approx(expected, rel=1e-6)
    assert scores["precision_at_1"] != pytest.approx(
        scores["r_precision"]
    )  # the three differ: a real check


def test_retrieval_with_ties_hand_computed() -> None:
    # 1-D: class a at 0 and 1, class b at 1 and 3 (R = 1 for every query).
    # Query 0 (a): 1 (b) and 2 (a) both at distance 1; index 1 comes first -> miss.
    # Query 1 (b): 2 (a) at 0 -> miss.  Query 2 (a): 1 (b) at 0 -> miss.
    # Query 3 (b): 1 (b) and 2 (a) both at distance 4; index 1 comes first -> hit.
    features = torch.tensor([[0.0], [1.0], [1.0], [3.0]])
    labels = torch.tensor([0, 1, 0, 1])
    assert metrics.retrieval_scores(features, labels) == pytest.approx(
        {"precision_at_1": 0.25, "r_precision": 0.25, "map_at_r": 0.25}
    )


def test_retrieval_without_classmates_is_none_not_an_error() -> None:
    assert metrics.retrieval_scores(torch.randn(4, 2), torch.arange(4)) == dict.fromkeys(
        metrics.RETRIEVAL_METRICS
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_retrieval_of_non_finite_features_is_nan_not_an_error(value: float) -> None:
    """The open-set scores of a model whose features overflowed: NaN (as feature_metrics gives), where pml
    raised a ValueError on NaN (its check that the queries lead the reference fails), ending the run, and
    ranked neighbours by NaN distances around an inf."""
    features = torch.randn(20, 2, generator=torch.Generator().manual_seed(0))
    features[3, 0] = value
    scores = metrics.retrieval_scores(features, torch.arange(20) % 4)
    assert set(scores) == set(metrics.RETRIEVAL_METRICS) and all(
        math.isnan(v) for v in scores.values()
    )


def test_class_geometry_hand_computed() -> None:
    # Class 0 at (0, +-1): mean (0, 0); class 1 at (4, 0) and (4, 2): mean (4, 1); class 2 at (0, 6): mean (0, 6).
    features = torch.tensor([[0.0, 1.0], [0.0, -1.0], [4.0, 0.0], [4.0, 2.0], [0.0, 6.0]])
    labels = torch.tensor([0, 0, 1, 1, 3])  # label 2 has no sample: left out
    geometry = metrics.class_geometry(features, labels)
    intra = (1 + 1 + 1 + 1 + 0) / 5
    gaps = [math.hypot(4, 1), 6.0, math.hypot(4, 5)]
    assert geometry == pytest.approx(
        {
            "intra_distance": intra,
            "min_center_gap": min(gaps),
            "mean_center_gap": sum(gaps) / 3,
            "min_gap_ratio": min(gaps) / intra,
            "mean_gap_ratio": sum(gaps) / 3 / intra,
            "feature_norm": (1 + 1 + 4 + math.hypot(4, 2) + 6) / 5,
        },
        rel=1e-6,
    )
    assert metrics.center_distance_ratio(features, labels) == pytest.approx(
        intra / (sum(gaps) / 3), rel=1e-6
    )


def test_class_geometry_of_non_finite_features_is_nan() -> None:
    geometry = metrics.class_geometry(torch.tensor([[float("nan")], [1.0]]), torch.tensor([0, 1]))
    assert list(geometry) == list(metrics.GEOMETRY_METRICS) and all(
        math.isnan(v) for v in geometry.values()
    )


def test_open_set_run_reports_closed_accuracy_retrieval_and_geometry(
    tiny_mnist, tmp_path: Path
) -> None:
    data_dir, arrays = tiny_mnist
    args = [
        *TINY,
        "--data-dir",
        data_dir,
        "--epochs",
        "1",
        "--no-plots",
        "--out",
        tmp_path,
        "--name",
        "open",
    ]
    result = run_main([*args, "--train-classes", "0-4"])
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "open" / "summary.json").read_text())
    assert summary["num_classes"] == 5 and summary["classes"] == ["0", "1", "2", "3", "4"]
    # Paths relative to the run folder: a summary names no folder of the machine it ran on.
    assert (
        summary["out"] == ".."
        and (tmp_path / "open" / summary["data_dir"]).resolve() == Path(data_dir).resolve()
    )
    assert summary["train_size"] == int((arrays["train_labels"] < 5).sum())
    assert summary["test_size"] == int((arrays["t10k_labels"] < 5).sum())
    gap, intra = summary["mean_center_gap"], summary["intra_distance"]
    assert (
        summary["mean_gap_ratio"] == pytest.approx(gap / intra) and gap >= summary["min_center_gap"]
    )
    unseen = int((arrays["t10k_labels"] >= 5).sum())  # P@1: a share of the unseen test images
    assert summary["open_precision_at_1"] * unseen == pytest.approx(
        round(summary["open_precision_at_1"] * unseen)
    )
    rows = list(csv.DictReader(open(tmp_path / "open" / "metrics.csv")))
    assert len(rows) == 1 and all(
        rows[0][name] for name in (*metrics.OPEN_SET_METRICS, *metrics.GEOMETRY_METRICS)
    )
    assert float(rows[0]["open_map_at_r"]) == pytest.approx(summary["open_map_at_r"], rel=1e-5)

    refused = run_main([*args[:-1], "refused", "--train-classes", "0,eleven"])
    assert refused.returncode == 2
    assert "no class 'eleven'" in stderr_error_line(refused.stderr)
    assert not (tmp_path / "refused").exists()
