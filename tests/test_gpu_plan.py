"""gpu_plan.py's two device calls, dry-run on the CPU with a tiny MNIST archive: the files that come back in $OUT."""

from __future__ import annotations

import csv
import json
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import check_ok, run_script

MAX_FILES, FILE_LIMIT = 8, 16 * 2**20  # what a device call brings back from $OUT


@pytest.fixture
def archive(tiny_mnist, tmp_path: Path) -> Path:
    """The tiny MNIST packed as `gpu_plan.py pack` packs the real data sets (tar -cJ, MNIST/ at the top)."""
    data_dir, _ = tiny_mnist
    path = tmp_path / "data.tar.xz"
    subprocess.run(["tar", "-C", str(data_dir), "-cJf", str(path), "MNIST"], check=True)
    return path


def back(out: Path) -> dict[str, Path]:
    """$OUT's files, checked against the device's limits on what comes back."""
    files = {p.name: p for p in out.iterdir()}
    assert all(p.is_file() and p.stat().st_size <= FILE_LIMIT for p in files.values()) and len(files) <= MAX_FILES
    return files


def test_measure_sums_runs_at_once_and_names_call_2(archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    flags = ["measure", "--out", out, "--archive", archive, "--data-dir", tmp_path / "unpacked", "--device", "cpu", "--test-timeout", "0"]
    flags += ["--matrix", "1:eager-fp32 2:eager-fp32", "--steps", "2", "--rounds", "1", "--warmup", "1", "--startup", "4"]
    proc = check_ok(run_script("gpu_plan.py", flags))
    assert set(back(out)) == {"measure.json", "measure.log"}
    report = json.loads((out / "measure.json").read_text())
    assert [(g["jobs"], g["mode"], g["amp"]) for g in report["groups"]] == [(1, "eager", "fp32"), (2, "eager", "fp32")]
    for group in report["groups"]:
        assert len(group["samples_per_s_each"]) == group["jobs"] and group["samples_per_s_sum"] == pytest.approx(
            sum(group["samples_per_s_each"])
        )
    best = max(report["groups"], key=lambda g: g["samples_per_s_sum"])
    assert report["best_fp32"] == best and report["gpu"] == "no CUDA"
    assert report["grid_seconds_estimate"] == pytest.approx(report["grid_train_samples"] / best["samples_per_s_sum"])
    line = f"call 2: python3 gpu_plan.py table --out $OUT --jobs {best['jobs']} --mode eager"
    assert line in proc.stdout and line in (out / "measure.log").read_text()


def table(archive: Path, tmp_path: Path, out: Path, epochs: int, losses: str, budget: float) -> dict:
    flags = ["table", "--out", out, "--archive", archive, "--data-dir", tmp_path / "unpacked", "--root", tmp_path / "device"]
    flags += ["--device", "cpu", "--mode", "eager", "--jobs", "2", "--epochs", str(epochs), "--budget", str(budget)]
    flags += ["--datasets", "mnist", "--feat-dims", "2", "--losses", losses, "--", "--train-samples", "64", "--batch-size", "16"]
    check_ok(run_script("gpu_plan.py", flags))
    return json.loads((out / "table.json").read_text())


def test_table_brings_back_finished_and_budget_stopped_runs(archive: Path, tmp_path: Path) -> None:
    """A finished run, then (same machine) one that the budget stops: both come back, the stopped one with the
    metrics.csv rows it reached, marked unfinished in its collected row and the table, its GIFs drawn from its frame data."""
    table(archive, tmp_path, tmp_path / "out1", 1, "standalone", 300)
    report = table(archive, tmp_path, tmp_path / "out2", 1000, "standalone xent", 20)
    runs = report["runs"]
    assert runs["standalone-mnist-feat=2"] == runs["standalone-mnist-feat=2"] | {"status": "finished", "epochs": 1}
    stopped = runs["xent-mnist-feat=2"]
    assert stopped["status"] == "unfinished" and 1 <= stopped["epochs"] < 1000
    files = back(tmp_path / "out2")
    assert set(files) == {"table.json", "table.log", "gpu-100ep.tgz", "gifs-1.tgz"}
    here = tmp_path / "here"
    for name in ("gpu-100ep.tgz", "gifs-1.tgz"):
        with tarfile.open(files[name]) as tar:
            tar.extractall(here, filter="data")
    finished = json.loads((here / "results/gpu-100ep/standalone-mnist-feat=2.json").read_text())
    assert (finished["epochs"], finished.get("unfinished")) == (1, None) and "samples_per_second" in finished
    row = json.loads((here / "results/gpu-100ep/xent-mnist-feat=2.json").read_text())
    with open(here / "runs/gpu-100ep/xent-mnist-feat=2/metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == stopped["epochs"] == row["epochs"] and row["acc"] == float(rows[-1]["test_acc"])
    assert (row["unfinished"], row["epochs_planned"]) == (True, 1000)
    assert json.loads((here / "results/gpu-plan/table.json").read_text())["runs"] == runs
    assert {p.relative_to(here).as_posix() for p in here.glob("imgs*/*/*.gif")} == {
        "imgs/standalone-mnist-feat=2/train.gif",
        "imgs/standalone-mnist-feat=2/test.gif",
        "imgs-unfinished/xent-mnist-feat=2/train.gif",
        "imgs-unfinished/xent-mnist-feat=2/test.gif",
    }
    table_text = check_ok(run_script("report.py", [here / "results/gpu-100ep", "--present"])).stdout
    assert f"| {stopped['epochs']} of 1000 (unfinished) |" in table_text
    assert f"{stopped['epochs']} of 1000 (unfinished)" in files["table.log"].read_text()
