"""bench.py end to end on the tiny MNIST (its JSON report, another checkout's code through --repo; figures are not
judged) and its refusals: one line, exit 2, before any timing is run or lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import REPO, check_ok, run_script, stderr_error_line

FAST = ["--batch-size", "16", "--steps", "2", "--warmup", "1", "--rounds", "2", "--device", "cpu"]


def test_bench_times_both_pipelines_of_the_repo_checkout(tiny_mnist, tmp_path: Path) -> None:
    """Both pipelines, their JSON report, and --repo: main.py's modules come from that checkout, whose train_step
    (here one that also writes a mark) is the one timed."""
    data_dir, _ = tiny_mnist
    other, mark, out = tmp_path / "other", tmp_path / "steps", tmp_path / "bench.json"
    other.mkdir()
    for path in [*REPO.glob("*.py"), REPO / "study_table.csv"]:
        shutil.copy(path, other)
    training = (other / "training.py").read_text()
    head, tail = training.split("def train_step(", 1)
    (other / "training.py").write_text(
        f"{head}def train_step(*args):\n    open({str(mark)!r}, 'a').write('step\\n')\n    return timed_step(*args)\n\n\ndef timed_step({tail}"
    )
    flags = [
        "--dataset",
        "mnist",
        "--data-dir",
        data_dir,
        *FAST,
        "--workers",
        "0",
        "--repo",
        other,
        "--json",
        out,
    ]
    proc = check_ok(run_script("bench.py", flags))
    # per pipeline: the warm-up's first batch, then 2 rounds of a first batch and 2 timed steps
    assert mark.read_text().count("step") == 2 * (1 + 2 * (1 + 2))
    report = json.loads(out.read_text())
    fast, loader = report["pipelines"]["fast"], report["pipelines"]["loader"]
    assert (
        len(fast["samples_per_s"]) == len(loader["samples_per_s"]) == 2
        and min(fast["samples_per_s"] + loader["samples_per_s"]) > 0
    )
    assert report["ratio_fast_over_loader"] == pytest.approx(
        fast["median_samples_per_s"] / loader["median_samples_per_s"]
    )
    assert report["ratio_per_round"] == pytest.approx(
        [f / lo for f, lo in zip(fast["samples_per_s"], loader["samples_per_s"])]
    )
    assert (
        report["bench"]["steps"] == 2 and report["device"] == "cpu" and report["repo"] == str(other)
    )
    assert "--batch-size" in report["main_flags"] and "ratio fast/loader" in proc.stdout


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device", "tpu"], "--device tpu"),
        (["--start-at", "1e20"], "unrecognized arguments: --start-at 1e20"),
        (["--json", ""], "--json '': give a file in an existing, writable folder"),
        (
            ["--json", "missing/bench.json"],
            "--json 'missing/bench.json': give a file in an existing, writable folder",
        ),
        (["--repo", "nowhere"], "--repo nowhere: no main.py there"),
        (["--json", "loop"], "--json 'loop': give a file in an existing, writable folder"),
        (["--batch-size", "100000"], "--batch-size 100000 is more than the 1437 train images"),
        (["--steps", "0"], "--steps must be 1 to 10000, --rounds 1 to 100"),
        (["--steps", "10001"], "--steps must be 1 to 10000, --rounds 1 to 100"),
        (["--workers", "2"], "--workers and --loader-amp set the loader path, which --fast-only"),
        (
            ["--loader-amp", "bf16"],
            "--workers and --loader-amp set the loader path, which --fast-only",
        ),
    ],
)
def test_bench_refuses_bad_flags_in_one_line_before_timing(
    tmp_path: Path, monkeypatch, capsys, flags: list[str], message: str
) -> None:
    """Each used to be a traceback, a run without a step (--batch-size beyond the 1,437 digits), or a timing lost
    after it ran (--json into a missing folder or "")."""
    import bench

    monkeypatch.chdir(tmp_path)
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*FAST, *flags, "--fast-only"])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and "round" not in out
    assert message in stderr_error_line(err)
    assert [p.name for p in tmp_path.iterdir()] == ["loop"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no CUDA")
def test_bench_refuses_cuda_without_cuda(tmp_path: Path, capsys) -> None:
    import bench

    with pytest.raises(SystemExit) as exit_info:
        bench.main([*FAST, "--device", "cuda", "--fast-only", "--json", str(tmp_path / "b.json")])
    assert exit_info.value.code == 2 and "--device cuda" in stderr_error_line(
        capsys.readouterr().err
    )
    assert not (tmp_path / "b.json").exists()


def test_bench_unreadable_data_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    """Also: bench.py sets the backends as main.py (training.cuda_backends: TF32 off on CUDA) before it loads."""
    import bench
    import training

    devices = []
    monkeypatch.setattr(training, "cuda_backends", devices.append)

    (tmp_path / "empty").mkdir()
    assert (
        bench.main(
            [
                "--dataset",
                "mnist",
                "--data-dir",
                str(tmp_path / "empty"),
                *FAST,
                "--json",
                str(tmp_path / "b.json"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bench.py: error: ")
    assert not (tmp_path / "b.json").exists() and devices == [torch.device("cpu")]


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_bench_interrupted_is_one_line(tmp_path: Path, monkeypatch, capsys, signum, code) -> None:
    """Ctrl-C used to end in a KeyboardInterrupt traceback, SIGTERM silently; the handlers are put back after."""
    import bench

    monkeypatch.setattr(bench, "benchmark", lambda *args: os.kill(os.getpid(), signum))
    before = signal.getsignal(signal.SIGTERM)
    assert bench.main([*FAST, "--fast-only", "--json", str(tmp_path / "b.json")]) == code
    assert (
        capsys.readouterr().err
        == "bench.py: interrupted; nothing was written (the rounds so far are lost)\n"
    )
    assert signal.getsignal(signal.SIGTERM) is before and not (tmp_path / "b.json").exists()
