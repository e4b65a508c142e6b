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
    # The step's operations (resnet, standalone): its forward, backward, loss and a guard of a few fused
    # ops. The guard that cloned and restored every tensor made it 531 on this counting.
    assert report["ops_per_step"] == sum(report["ops_per_step_by_name"].values()) <= 150  # issue 22: at most 150
    assert report["ops_per_step_by_name"]["aten::conv2d"] == report["ops_per_step_by_name"]["aten::convolution_backward"] > 0
    assert "aten::clone" not in report["ops_per_step_by_name"] and report["ops_per_step_by_name"]["aten::where"] <= 3


def test_bench_accuracy_check_compares_main_runs_per_seed_and_reuses_finished_ones(tiny_mnist, tmp_path: Path) -> None:
    data_dir, _ = tiny_mnist
    common = ["--data-dir", data_dir, "--batch-size", "16", "--workers", "0", "--accuracy-epochs", "1", "--train-samples", "64"]
    common += ["--out", tmp_path / "runs"]
    check_ok(run_script("bench.py", [*common, "--seeds", "0,1", "--amp", "bf16", "--json", tmp_path / "bf16.json"]))
    report = json.loads((tmp_path / "bf16.json").read_text())
    assert [s["seed"] for s in report["seeds"]] == [0, 1]
    for per_seed in report["seeds"]:
        runs = per_seed["runs"]
        assert (runs["loader"]["pipeline"], runs["loader"]["amp"]) == ("loader", "off")
        assert (runs["fast"]["pipeline"], runs["fast"]["amp"]) == ("fast", "bf16")
        for run in runs.values():
            summary = json.loads((Path(run["run"]) / "summary.json").read_text())
            assert summary["acc"] == run["acc"] and summary["epochs"] == 1 and summary["seed"] == per_seed["seed"]
        assert per_seed["difference_points"] == pytest.approx(100 * (runs["fast"]["acc"] - runs["loader"]["acc"]))
    mean = {label: sum(s["runs"][label]["acc"] for s in report["seeds"]) / 2 for label in ("loader", "fast")}
    assert report["mean_acc"] == pytest.approx(mean)
    assert report["mean_difference_points"] == pytest.approx(100 * (mean["fast"] - mean["loader"]))

    loader_run = Path(report["seeds"][1]["runs"]["loader"]["run"])
    written = (loader_run / "summary.json").stat().st_mtime_ns
    proc = check_ok(run_script("bench.py", [*common, "--seeds", "1", "--amp", "off", "--json", tmp_path / "off.json"]))
    again = json.loads((tmp_path / "off.json").read_text())["seeds"][0]["runs"]
    assert f"reusing the finished run {loader_run}" in proc.stdout
    assert (loader_run / "summary.json").stat().st_mtime_ns == written
    assert again["loader"]["acc"] == report["seeds"][1]["runs"]["loader"]["acc"]
    assert (again["fast"]["amp"], again["fast"]["seed"]) == ("off", 1) and Path(again["fast"]["run"]).is_dir()


def test_bench_seeds_must_be_integers(tmp_path: Path) -> None:
    proc = run_script("bench.py", ["--accuracy-epochs", "1", "--seeds", "0,x"])
    assert proc.returncode == 2 and "--seeds" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_bad_data_dir_is_one_line(tmp_path: Path) -> None:
    proc = run_script("bench.py", ["--data-dir", tmp_path / "nothing", "--steps", "1"])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_bench_cuda_graph_needs_the_fast_path_alone_and_cuda() -> None:
    """--cuda-graph times the fast path's captured step: one line, exit 2, without --fast-only or without CUDA."""
    proc = run_script("bench.py", ["--cuda-graph", "--steps", "1"])
    assert proc.returncode == 2 and "--fast-only" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_script("bench.py", ["--cuda-graph", "--fast-only", "--device", "cpu", "--steps", "1"])
    assert proc.returncode == 2 and "--cuda-graph" in proc.stderr and "Traceback" not in proc.stderr
