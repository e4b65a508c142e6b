"""bench.py end to end on the tiny MNIST (its JSON report, another checkout's code through --repo; figures are not
judged) and its refusals: one line, exit 2 (1 for unreadable data), before any timing is run or lost."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import REPO, check_ok, run_script, stderr_error_line

FAST = ["--batch-size", "4", "--steps", "1", "--warmup", "1", "--rounds", "2", "--device", "cpu"]


def test_bench_times_both_pipelines_of_the_repo_checkout(tiny_mnist, tmp_path: Path) -> None:
    """Both pipelines, their JSON report, and --repo: main.py's modules come from that checkout, whose train_step
    (here one that also writes a mark) is the one timed."""
    other, mark, out = tmp_path / "other", tmp_path / "steps", tmp_path / "bench.json"
    other.mkdir()
    for path in [*REPO.glob("*.py"), REPO / "study_table.csv"]:
        shutil.copy(path, other)
    head, tail = (other / "training.py").read_text().split("def train_step(", 1)
    marked = f"def train_step(*args):\n    open({str(mark)!r}, 'a').write('step\\n')\n    return timed_step(*args)\n\n\ndef timed_step("
    (other / "training.py").write_text(head + marked + tail)
    flags = ["--dataset", "mnist", "--data-dir", tiny_mnist[0], *FAST, "--model", "lenet++"]
    flags += ["--workers", "0", "--repo", other, "--json", out]
    proc = check_ok(run_script("bench.py", flags))
    # per pipeline: the warm-up's first batch, then 2 rounds of a first batch and 1 timed step
    assert mark.read_text().count("step") == 2 * (1 + 2 * (1 + 1))
    report = json.loads(out.read_text())
    fast, loader = (report["pipelines"][k]["samples_per_s"] for k in ("fast", "loader"))
    assert len(fast) == len(loader) == 2 and min(fast + loader) > 0
    assert report["ratio_per_round"] == pytest.approx([f / s for f, s in zip(fast, loader)])
    medians = [report["pipelines"][k]["median_samples_per_s"] for k in ("fast", "loader")]
    assert report["ratio_fast_over_loader"] == pytest.approx(medians[0] / medians[1])
    assert (report["bench"]["steps"], report["device"], report["repo"]) == (1, "cpu", str(other))
    assert "--batch-size" in report["main_flags"] and "ratio fast/loader" in proc.stdout


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal where there is no CUDA")
JSON = "cannot write there"
LOADER = "--workers and --loader-amp set the loader path, which --fast-only does not run"


@pytest.mark.parametrize(
    ("flags", "code", "message"),
    [
        ("--device tpu", 2, "--device tpu"),
        pytest.param("--device cuda", 2, "--device cuda", marks=NO_CUDA),
        ("--start-at 1e20", 2, "unrecognized arguments: --start-at 1e20"),
        ("--json ''", 2, f"--json '': {JSON} (No such file or directory)"),
        ("--json m/b.json", 2, f"--json 'm/b.json': {JSON} (No such file or directory)"),
        ("--json loop", 2, f"--json 'loop': {JSON} (Too many levels of symbolic links)"),
        ("--repo nowhere", 2, "--repo nowhere: no main.py there"),
        ("--batch-size 100000", 2, "--batch-size 100000 is more than the 1437 train images"),
        ("--steps 0", 2, "argument --steps: '0' is not an integer in [1, 10000]"),
        ("--steps 10001", 2, "argument --steps: '10001' is not an integer in [1, 10000]"),
        ("--rounds 101", 2, "argument --rounds: '101' is not an integer in [1, 100]"),
        ("--steps x", 2, "argument --steps: 'x' is not an integer in [1, 10000]"),
        ("--workers 2", 2, LOADER),
        ("--loader-amp bf16", 2, LOADER),
        ("--dataset mnist --data-dir empty", 1, "bench.py: error: "),
    ],
)
def test_bench_refuses_bad_flags_in_one_line_before_timing(
    tmp_path, monkeypatch, capsys, flags, code, message
):
    """Each used to be a traceback, a run without a step (--batch-size beyond the 1,437 digits), or a timing lost
    after it ran (--json into a missing folder or ""). bench.py sets the backends as main.py (training.cuda_backends:
    TF32 off on CUDA) before it loads the data."""
    import bench
    import training

    monkeypatch.chdir(tmp_path)
    devices = []
    monkeypatch.setattr(training, "cuda_backends", devices.append)
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(bench.main([*FAST, *shlex.split(flags), "--fast-only"]))
    out, err = capsys.readouterr()
    assert exit_info.value.code == code and "round" not in out
    assert message in stderr_error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "loop"]
    assert code == 2 or devices == [torch.device("cpu")]


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_bench_interrupted_is_one_line(tmp_path: Path, monkeypatch, capsys, signum, code) -> None:
    """Ctrl-C used to end in a KeyboardInterrupt traceback, SIGTERM silently; the handlers are put back after."""
    import bench

    monkeypatch.setattr(bench, "benchmark", lambda *args: os.kill(os.getpid(), signum))
    before = signal.getsignal(signal.SIGTERM)
    assert bench.main([*FAST, "--fast-only", "--json", str(tmp_path / "b.json")]) == code
    err = capsys.readouterr().err
    assert err == "bench.py: interrupted; nothing was written (the rounds so far are lost)\n"
    assert signal.getsignal(signal.SIGTERM) is before and not (tmp_path / "b.json").exists()
