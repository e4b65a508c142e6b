"""bench.py end to end on the tiny MNIST: its JSON report and its accuracy check (figures are not judged)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import check_ok, run_script


def test_bench_reports_both_pipelines(tiny_mnist, tmp_path: Path) -> None:
    data_dir, _ = tiny_mnist
    out = tmp_path / "bench.json"
    args = ["--data-dir", data_dir, "--batch-size", "16", "--steps", "2", "--warmup", "1", "--rounds", "2", "--workers", "0", "--json", out]
    proc = check_ok(run_script("bench.py", args))
    report = json.loads(out.read_text())
    fast, loader = report["pipelines"]["fast"], report["pipelines"]["loader"]
    assert fast["samples_per_s"] > 0 and loader["samples_per_s"] > 0
    assert len(fast["rounds_samples_per_s"]) == len(loader["rounds_samples_per_s"]) == 2
    assert report["ratio_fast_over_loader"] == pytest.approx(fast["samples_per_s"] / loader["samples_per_s"])
    assert report["config"]["steps"] == 2 and report["device"] == "cpu"
    assert "ratio fast/loader" in proc.stdout


def test_bench_accuracy_check_compares_two_main_runs(tiny_mnist, tmp_path: Path) -> None:
    data_dir, _ = tiny_mnist
    out = tmp_path / "acc.json"
    args = ["--data-dir", data_dir, "--batch-size", "16", "--workers", "0", "--accuracy-epochs", "1", "--amp", "bf16"]
    check_ok(run_script("bench.py", [*args, "--train-samples", "64", "--out", tmp_path / "runs", "--json", out]))
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert (runs["loader"]["pipeline"], runs["loader"]["amp"]) == ("loader", "off")
    assert (runs["fast"]["pipeline"], runs["fast"]["amp"]) == ("fast", "bf16")
    for run in runs.values():
        summary = json.loads((Path(run["run"]) / "summary.json").read_text())
        assert summary["acc"] == run["acc"] and summary["epochs"] == 1
    assert report["difference_points"] == pytest.approx(100 * (runs["fast"]["acc"] - runs["loader"]["acc"]))


def test_bench_bad_data_dir_is_one_line(tmp_path: Path) -> None:
    proc = run_script("bench.py", ["--data-dir", tmp_path / "nothing", "--steps", "1"])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
