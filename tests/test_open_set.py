"""The open-set split (--train-classes) and a run's open-set retrieval and class geometry (their
computation in test_metrics.py, the geometry's picture in test_visualize.py)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import TINY, metrics_without_seconds, stderr_error_line

import metrics
from datasets import Dataset, ImageData, open_set_split, parse_class_list
from main import main

FASHION = "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot".split(",")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0-4", [0, 1, 2, 3, 4]),
        ("5,0,7", [0, 5, 7]),
        ("trouser, BAG", [1, 8]),
        ("T-shirt/top,2-3,Ankle boot", [0, 2, 3, 9]),
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
def test_class_lists_by_index_range_and_name_or_refused(spec: str, expected: list | str) -> None:
    if isinstance(expected, list):
        assert parse_class_list(spec, FASHION) == expected
    else:
        with pytest.raises(ValueError, match=re.escape(expected)):
            parse_class_list(spec, FASHION)


def test_open_set_split_keeps_seen_classes_and_relabels_both_sides() -> None:
    labels = torch.tensor([0, 1, 2, 3, 4, 2, 4, 0])
    images = labels.to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()  # its label
    train, test = ImageData(images, labels), ImageData(images.flip(0), labels.flip(0))
    data = Dataset("toy", train, test, list("abcde"), (), "memory")
    closed, unseen = open_set_split(data, [1, 3, 4])
    assert closed.classes == ["b", "d", "e"]
    assert closed.train.labels.tolist() == [0, 1, 2, 2]
    assert closed.train.images[:, 0, 0, 0].tolist() == [1, 3, 4, 4]
    assert closed.test.labels.tolist() == [2, 2, 1, 0]
    assert unseen.labels.tolist() == [0, 1, 1, 0]  # test images of a (0) and c (1), in order
    assert unseen.images[:, 0, 0, 0].tolist() == [0, 2, 2, 0]


def test_open_set_run_reports_closed_accuracy_retrieval_and_geometry(tiny_mnist, tmp_path, capsys):
    """--train-classes 0-4: trained and tested on those, retrieval on the others, geometry each epoch;
    paths in summary.json relative to the run folder; a bad class list is one line, exit 2."""
    data_dir, arrays = tiny_mnist
    args = [*TINY, "--data-dir", str(data_dir), "--epochs", "1", "--out", str(tmp_path), "--name"]
    assert main([*args, "open", "--train-classes", "0-4"]) == 0
    run_dir = tmp_path / "open"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_classes"] == 5 and summary["classes"] == ["0", "1", "2", "3", "4"]
    assert summary["out"] == ".."
    assert (run_dir / summary["data_dir"]).resolve() == data_dir.resolve()
    assert summary["train_size"] == int((arrays["train_labels"] < 5).sum())
    assert summary["test_size"] == int((arrays["t10k_labels"] < 5).sum())
    with np.load(run_dir / "frames" / "test" / "epoch_001.npz") as frame:  # the features measured
        features, labels = (torch.from_numpy(frame[k]) for k in ("features", "labels"))
    geometry = metrics.class_geometry(features, labels)
    assert {k: summary[k] for k in geometry} == pytest.approx(geometry, rel=1e-5)
    unseen = int((arrays["t10k_labels"] >= 5).sum())  # P@1: a share of the unseen test images
    hits = summary["open_precision_at_1"] * unseen
    assert hits == pytest.approx(round(hits))
    rows = metrics_without_seconds(run_dir)
    assert len(rows) == 1 and all(rows[0][k] for k in (*metrics.OPEN_SET_METRICS, *geometry))
    assert float(rows[0]["open_map_at_r"]) == pytest.approx(summary["open_map_at_r"], rel=1e-5)
    with pytest.raises(SystemExit) as info:
        main([*args, "refused", "--train-classes", "0,eleven"])
    assert info.value.code == 2
    assert "no class 'eleven'" in stderr_error_line(capsys.readouterr().err)
    assert not (tmp_path / "refused").exists()
