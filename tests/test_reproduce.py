"""reproduce.sh (the sweep: checks, seeds, duplicates, the time limit) on the CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import listing
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from test_report import table_rows  # noqa: E402

import report  # noqa: E402


def fake_python(tmp_path: Path, body: str = "") -> tuple[Path, Path]:
    """A stand-in for python that records each main.py command in $CALLS/<n> and then runs `body` (sh)."""
    calls, stub = tmp_path / "calls", tmp_path / "python"
    calls.mkdir(exist_ok=True)
    stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "$(mktemp "$CALLS/XXXXXX")"\n{body}\n')
    stub.chmod(0o755)
    return stub, calls


@pytest.mark.parametrize("jobs", ["0", "00", "abc", "-1", "2x", "1.5"])
def test_reproduce_refuses_a_bad_jobs_count(tmp_path: Path, jobs: str) -> None:
    """JOBS=0 used to spin forever and JOBS=abc to start every run at once: one line, exit 2, nothing started."""
    env = {
        **os.environ,
        "JOBS": jobs,
        "OUT": str(tmp_path / "runs"),
        "PYTHON": sys.executable,
        "LOSSES": "xent",
        "DATASETS": "mnist",
    }
    before = listing(tmp_path)
    result = subprocess.run(
        ["bash", "reproduce.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and result.stdout == ""
    assert (
        result.stderr
        == f"reproduce.sh: error: JOBS must be a positive integer (runs at once), not '{jobs}'\n"
    )
    assert listing(tmp_path) == before


def header_examples() -> list[str]:
    """The example command lines of reproduce.sh's header, without their comments."""
    lines = (ROOT / "reproduce.sh").read_text().split("\nset -u", 1)[0].splitlines()
    return [
        line[1:].split("  #")[0].strip()
        for line in lines
        if "./reproduce.sh" in line and line.startswith("#   ")
    ]


def test_reproduce_header_examples_make_valid_main_commands(tmp_path: Path, monkeypatch) -> None:
    """Each example of the header, run as written (in a copy of the script, with a python that only
    records its arguments), exits 0 and gives main.py commands that main.py's own checks accept; they
    used to pass --data-dir data, which does not exist, even to digits. The seeds example names seed N's run -seed=N."""
    import config

    repo, calls = tmp_path / "repo", tmp_path / "calls"
    repo.mkdir(), calls.mkdir(), (tmp_path / "shared" / "data").mkdir(parents=True)
    shutil.copy(ROOT / "reproduce.sh", repo)
    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$(mktemp "$CALLS/XXXXXX")"\n')
    stub.chmod(0o755)
    examples = header_examples()
    assert (
        len(examples) == 5
        and any("SEEDS=" in e for e in examples)
        and any("DATA_DIR" not in e for e in examples)
    )
    for example in examples:
        env = {"PATH": os.environ["PATH"], "PYTHON": str(stub), "CALLS": str(calls)}
        result = subprocess.run(
            ["bash", "-c", example], cwd=repo, env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0 and "FAILED" not in result.stdout, (
            example,
            result.stdout,
            result.stderr,
        )
    commands = [path.read_text().splitlines() for path in calls.iterdir()]
    assert len(commands) == 18 + 18 + 1 + 3 * 2 * 3 + 3 * 2
    monkeypatch.chdir(repo)
    for command in commands:
        assert command[0] == "main.py"
        args = config.parse_args(command[1:])  # exits 2 on a bad command
        assert (args.data_dir is None) == (args.dataset == "digits")
        assert args.name == f"{args.loss}-{args.dataset}-feat={args.feat_dim}" + (
            f"-seed={args.seed}" if args.seed else ""
        )
    seeds = [
        args.seed
        for args in map(config.parse_args, (c[1:] for c in commands))
        if args.epochs == 3 and args.amp == "off"
    ]
    assert Counter(seeds) == {0: 18 + 6, 1: 6, 2: 6}


@pytest.mark.parametrize(
    "env,message",
    [
        (
            {"DATASETS": "digits mnist"},
            "DATASETS has mnist, which needs DATA_DIR (the folder with MNIST/raw",
        ),
        (
            {"DATASETS": "digits", "SEEDS": "0 one"},
            "SEEDS must be non-negative integers separated by spaces, not '0 one'",
        ),
        ({"DATASETS": "digits", "SEEDS": "-1"}, "SEEDS must be non-negative integers"),
        ({"DATASETS": "digits", "SEEDS": "99999999999"}, "SEEDS must be non-negative integers"),
        ({"DATASETS": "digits", "ARGS": "--seed=3"}, 'give seeds as SEEDS="0 1 2", not --seed'),
        ({"DATASETS": "digits", "OUT": "{tmp}/runs "}, "OUT '{tmp}/runs ' starts or ends with"),
    ],
)
def test_reproduce_refuses_missing_data_dir_and_bad_seeds(
    tmp_path: Path, env: dict, message: str
) -> None:
    """One line, exit 2, nothing started or made (a missing DATA_DIR used to become --data-dir data for every run)."""
    extra = env.pop("ARGS", "").split()
    env = {**os.environ, "OUT": str(tmp_path / "runs"), "PYTHON": sys.executable, **env}
    env, message = (
        {k: v.replace("{tmp}", str(tmp_path)) for k, v in env.items()},
        message.replace("{tmp}", str(tmp_path)),
    )
    env.pop("DATA_DIR", None)
    before = listing(tmp_path)
    result = subprocess.run(
        ["bash", "reproduce.sh", *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(
        f"reproduce.sh: error: {message}"
    )
    assert listing(tmp_path) == before


def write_tree(root: Path, classes: int = 3, per_class: int = 8, size: int = 28) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for k in range(classes):
            folder = root / split / f"c{k}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                image = (rng.random((size, size)) * 60).astype(np.uint8)
                image[:, k * 2 : k * 2 + 2] = 250
                Image.fromarray(image).save(folder / f"{i}.png")


def test_reproduce_runs_each_grid_point_and_seed_once(tmp_path: Path, capsys) -> None:
    """Each (grid point, seed) runs once, seed N's folder named -seed=N, and a second sweep skips them
    all; report.py makes each grid point's two seeds one row with n = 2."""
    data = tmp_path / "data"
    write_tree(data, classes=10, per_class=3)  # --dataset mnist must be 28x28 grey of 10 classes
    out = tmp_path / "runs"
    env = {
        **os.environ,
        "DATA_DIR": str(data),
        "EPOCHS": "1",
        "OUT": str(out),
        "JOBS": "2",
        "PYTHON": sys.executable,
        "LOSSES": "standalone",
        "DATASETS": "mnist",
        "FEAT_DIMS": "2",
        "SEEDS": "0 1",
    }
    extra = ["--batch-size", "8", "--no-plots", "--model", "lenet++"]
    first = subprocess.run(
        ["bash", "reproduce.sh", *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert first.returncode == 0, first.stdout + first.stderr
    names = {"standalone-mnist-feat=2", "standalone-mnist-feat=2-seed=1"}
    assert {p.parent.name for p in out.glob("*/summary.json")} == names
    for name in names:
        summary = json.loads((out / name / "summary.json").read_text())
        assert (
            summary["epochs"] == 1 and summary["batch_size"] == 8 and summary["model"] == "lenet++"
        )
        assert summary["seed"] == (1 if name.endswith("-seed=1") else 0)
    assert report.main([str(out), "--present"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [(r[0], r[12]) for r in rows] == [("standalone", "2")]
    stamps = {name: (out / name / "summary.json").stat().st_mtime_ns for name in names}
    second = subprocess.run(
        ["bash", "reproduce.sh", *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert second.returncode == 0
    assert second.stdout.count("skip ") == 2 and "start " not in second.stdout
    assert stamps == {name: (out / name / "summary.json").stat().st_mtime_ns for name in names}


def test_reproduce_reports_failed_runs(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DATA_DIR": str(tmp_path / "nowhere"),
        "EPOCHS": "1",
        "OUT": str(tmp_path / "runs"),
        "PYTHON": sys.executable,
    }
    env.update(LOSSES="xent", DATASETS="mnist", FEAT_DIMS="2")
    result = subprocess.run(
        ["bash", "reproduce.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    assert "FAILED xent-mnist-feat=2" in result.stdout and "1 run(s) failed" in result.stdout


@pytest.mark.parametrize(
    "variable",
    [
        "EPOCHS",
        "SEEDS",
        "OUT",
        "JOBS",
        "LOSSES",
        "DATASETS",
        "FEAT_DIMS",
        "PYTHON",
        "DATA_DIR",
        "TIME_LIMIT",
    ],
)
def test_reproduce_refuses_a_variable_set_empty(tmp_path: Path, variable: str) -> None:
    """EPOCHS="" used to start 100-epoch runs (an empty value meant the default): one line, exit 2, nothing run."""
    stub, calls = fake_python(tmp_path)
    env = {
        **os.environ,
        "OUT": str(tmp_path / "runs"),
        "PYTHON": str(stub),
        "CALLS": str(calls),
        "DATASETS": "digits",
        variable: " ",
    }
    env.pop("DATA_DIR", None) if variable != "DATA_DIR" else None
    result = subprocess.run(
        ["bash", "reproduce.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and result.stdout == ""
    assert (
        result.stderr
        == f"reproduce.sh: error: {variable} is set but empty; give it a value or unset it\n"
    )
    assert not (tmp_path / "runs").exists() and not any(calls.iterdir())


@pytest.mark.parametrize(
    "env", [{"SEEDS": "0 0"}, {"SEEDS": "1 01"}, {"DATASETS": "digits digits"}]
)
def test_reproduce_runs_a_grid_point_listed_twice_once(tmp_path: Path, env: dict) -> None:
    """SEEDS="0 0" JOBS=2 used to start one run twice at once, both writing one log."""
    stub, calls = fake_python(tmp_path, "sleep 1")
    env = {
        **os.environ,
        "OUT": str(tmp_path / "runs"),
        "PYTHON": str(stub),
        "CALLS": str(calls),
        "JOBS": "2",
    } | {"DATASETS": "digits", "LOSSES": "xent", "FEAT_DIMS": "2", **env}
    env.pop("DATA_DIR", None)
    result = subprocess.run(
        ["bash", "reproduce.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    names = [
        path.read_text().splitlines()[path.read_text().splitlines().index("--name") + 1]
        for path in calls.iterdir()
    ]
    assert len(names) == 1 and result.stdout.count("start ") == 1
    assert f"skip {names[0]} (listed twice)" in result.stdout
    assert (tmp_path / "runs" / f"{names[0]}.log").read_text().count("== ") == 1


def test_reproduce_time_limit_stops_the_runs_with_sigterm_and_keeps_their_logs(
    tmp_path: Path,
) -> None:
    """TIME_LIMIT seconds after the start every run gets SIGTERM (main.py then saves a checkpoint), exit 124;
    the next call appends to the logs and starts the unfinished runs again (main.py resumes them)."""
    stub, calls = fake_python(
        tmp_path, "trap 'echo term >> \"$CALLS.terms\"; exit 143' TERM\nsleep 20 &\nwait"
    )
    env = {
        **os.environ,
        "OUT": str(tmp_path / "runs"),
        "PYTHON": str(stub),
        "CALLS": str(calls),
        "TIME_LIMIT": "2",
        "JOBS": "2",
    }
    env |= {"DATASETS": "digits", "LOSSES": "xent cent", "FEAT_DIMS": "2"}
    env.pop("DATA_DIR", None)
    for attempt in (1, 2):
        started = time.monotonic()
        result = subprocess.run(
            ["bash", "reproduce.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 124 and time.monotonic() - started < 15, (
            result.stdout + result.stderr
        )
        assert "TIME_LIMIT (2 s) reached" in result.stdout and result.stdout.count("stopped ") == 2
        assert Path(f"{calls}.terms").read_text() == "term\n" * 2 * attempt
    assert (tmp_path / "runs" / "xent-digits-feat=2.log").read_text().count("== ") == 2


def test_reproduce_passes_a_star_on_as_a_name_not_as_files(tmp_path: Path) -> None:
    """DATASETS="*" used to become the names of the files in the repository, one run each: now main.py gets "*" (and refuses it)."""
    stub, calls = fake_python(tmp_path)
    env = {
        **os.environ,
        "OUT": str(tmp_path / "runs"),
        "PYTHON": str(stub),
        "CALLS": str(calls),
        "DATA_DIR": str(tmp_path),
    }
    env |= {"DATASETS": "*", "LOSSES": "xent", "FEAT_DIMS": "2"}
    result = subprocess.run(
        ["bash", "reproduce.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [command] = [path.read_text().splitlines() for path in calls.iterdir()]
    assert command[command.index("--dataset") + 1] == "*"
