"""reproduce.sh (the sweep: checks, seeds, duplicates, the time limit) on the CPU."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, listing, write_tiny_mnist
from test_report import table_rows

import config
import report


def fake_python(tmp_path: Path, body: str = "") -> Path:
    """A stand-in for python that records each main.py command in a file of its own in
    <tmp_path>/calls and then runs `body` (sh)."""
    calls, stub = tmp_path / "calls", tmp_path / "python"
    calls.mkdir(exist_ok=True)
    stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "$(mktemp "$CALLS/XXXXXX")"\n{body}\n')
    stub.chmod(0o755)
    return stub


def reproduce(tmp_path: Path, env: dict, *args: str, body: str = "", timeout: float = 60):
    """bash reproduce.sh ARGS, with OUT=<tmp_path>/runs, the fake python (running `body`) and no
    DATA_DIR, but where `env` says otherwise: (the process, the main.py commands it started)."""
    stub = fake_python(tmp_path, body)
    environ = {k: v for k, v in os.environ.items() if k != "DATA_DIR"}
    environ |= dict(OUT=str(tmp_path / "runs"), PYTHON=str(stub), CALLS=str(tmp_path / "calls"))
    options = dict(cwd=REPO, env=environ | env, capture_output=True, text=True, timeout=timeout)
    result = subprocess.run(["bash", "reproduce.sh", *args], **options)
    return result, [path.read_text().splitlines() for path in (tmp_path / "calls").iterdir()]


# VAR=value words and arguments | the one error line after "reproduce.sh: error: " ({tmp}: the
# test's folder). JOBS=0 used to spin forever and JOBS=abc to start every run at once; a missing
# DATA_DIR used to become --data-dir data for every run.
REFUSALS = """
DATASETS='digits mnist' | DATASETS has mnist, which needs DATA_DIR (the folder with MNIST/raw, FashionMNIST/raw, cifar10-jpg, ...): e.g. DATA_DIR=../shared/data ./reproduce.sh
SEEDS='0 one' | SEEDS must be non-negative integers separated by spaces, not '0 one'
SEEDS=-1 | SEEDS must be non-negative integers separated by spaces, not '-1'
SEEDS=99999999999 | SEEDS must be non-negative integers separated by spaces, not '99999999999'
--seed=3 | give seeds as SEEDS="0 1 2", not --seed (each seed needs a run folder of its own)
'OUT={tmp}/runs ' | OUT '{tmp}/runs ' starts or ends with whitespace; give it without
EPOCHS=0 | EPOCHS must be a positive integer, not '0'
TIME_LIMIT=1m | TIME_LIMIT must be whole seconds (0: none), not '1m'
"""
for jobs in ("0", "00", "abc", "-1", "2x", "1.5"):
    REFUSALS += f"JOBS={jobs} | JOBS must be a positive integer (runs at once), not '{jobs}'\n"
# EPOCHS="" used to start 100-epoch runs (an empty value meant the default).
for var in "EPOCHS SEEDS OUT JOBS LOSSES DATASETS FEAT_DIMS PYTHON DATA_DIR TIME_LIMIT".split():
    REFUSALS += f"{var}=' ' | {var} is set but empty; give it a value or unset it\n"


@pytest.mark.parametrize(
    "words,message",
    [pytest.param(*r.split(" | "), id=r.split(" | ")[0]) for r in REFUSALS.strip().splitlines()],
)
def test_reproduce_refusals_are_one_line(tmp_path: Path, words: str, message: str) -> None:
    """One line, exit 2, nothing started or made."""
    words = shlex.split(words.replace("{tmp}", str(tmp_path)))
    env = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))
    fake_python(tmp_path)
    before = listing(tmp_path)
    args = [w for w in words if w.startswith("-")]
    result, calls = reproduce(tmp_path, {"DATASETS": "digits", **env}, *args)
    assert (result.returncode, result.stdout, calls) == (2, "", [])
    assert result.stderr == f"reproduce.sh: error: {message.replace('{tmp}', str(tmp_path))}\n"
    assert listing(tmp_path) == before


def test_reproduce_header_examples_make_valid_main_commands(tmp_path: Path, monkeypatch) -> None:
    """Each example of the header, run as written (in a copy of the script, with a python that only
    records its arguments), exits 0 and gives main.py commands that main.py's own checks accept;
    they used to pass --data-dir data, which does not exist, even to digits. The seeds example
    names seed N's run -seed=N."""
    repo = tmp_path / "repo"
    repo.mkdir(), (tmp_path / "shared" / "data").mkdir(parents=True)
    shutil.copy(REPO / "reproduce.sh", repo)
    stub = fake_python(tmp_path)
    head = (REPO / "reproduce.sh").read_text().split("\nset -u", 1)[0].splitlines()
    examples = [x[1:].split("  #")[0].strip() for x in head if x.startswith("#   ") and "./re" in x]
    assert len(examples) == 5 and any("SEEDS=" in e for e in examples)
    assert any("DATA_DIR" not in e for e in examples)
    env = {"PATH": os.environ["PATH"], "PYTHON": str(stub), "CALLS": str(tmp_path / "calls")}
    for example in examples:
        result = subprocess.run(
            ["bash", "-c", example], cwd=repo, env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0 and "FAILED" not in result.stdout, (example, result)
    commands = [path.read_text().splitlines() for path in (tmp_path / "calls").iterdir()]
    assert len(commands) == 18 + 18 + 1 + 3 * 2 * 3 + 3 * 2
    monkeypatch.chdir(repo)
    seeds = []
    for command in commands:
        assert command[0] == "main.py"
        args = config.parse_args(command[1:])  # exits 2 on a bad command
        assert (args.data_dir is None) == (args.dataset == "digits")
        seed = f"-seed={args.seed}" if args.seed else ""
        assert args.name == f"{args.loss}-{args.dataset}-feat={args.feat_dim}{seed}"
        seeds += [args.seed] if args.epochs == 3 and args.amp == "off" else []
    assert Counter(seeds) == {0: 18 + 6, 1: 6, 2: 6}


def test_reproduce_runs_each_grid_point_and_seed_once(tmp_path: Path, capsys) -> None:
    """Each (grid point, seed) runs once, seed N's folder named -seed=N, and a second sweep skips
    them all; report.py makes each grid point's two seeds one row with n = 2."""
    write_tiny_mnist(tmp_path / "data")
    out = tmp_path / "runs"
    env = dict(DATA_DIR=str(tmp_path / "data"), EPOCHS="1", JOBS="2", PYTHON=sys.executable)
    env |= dict(LOSSES="standalone", DATASETS="mnist", FEAT_DIMS="2", SEEDS="0 1")
    extra = "--train-samples 16 --batch-size 8 --no-plots --model lenet++ --threads 1".split()
    first, _ = reproduce(tmp_path, env, *extra, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    names = {"standalone-mnist-feat=2", "standalone-mnist-feat=2-seed=1"}
    assert {p.parent.name for p in out.glob("*/summary.json")} == names
    for name in names:
        summary = json.loads((out / name / "summary.json").read_text())
        keys = ("epochs", "batch_size", "model", "seed")
        assert [summary[k] for k in keys] == [1, 8, "lenet++", int(name.endswith("-seed=1"))]
    assert report.main([str(out), "--present"]) == 0
    assert [(r[0], r[12]) for r in table_rows(capsys.readouterr().out)] == [("standalone", "2")]
    stamps = {name: (out / name / "summary.json").stat().st_mtime_ns for name in names}
    second, _ = reproduce(tmp_path, env, *extra, timeout=600)
    assert second.returncode == 0
    assert second.stdout.count("skip ") == 2 and "start " not in second.stdout
    assert stamps == {name: (out / name / "summary.json").stat().st_mtime_ns for name in names}


# VAR=value words | the python's sh body | exit code | lines of the output. SEEDS="0 0" JOBS=2 used
# to start one run twice at once, both writing one log; DATASETS="*" used to become the names of
# the files in the repository, one run each: now main.py gets "*" (and refuses it).
ONE_RUN = """
SEEDS='0 0' | | 0 | start xent-digits-feat=2;skip xent-digits-feat=2 (listed twice)
SEEDS='1 01' | | 0 | skip xent-digits-feat=2-seed=1 (listed twice)
DATASETS='digits digits' | | 0 | skip xent-digits-feat=2 (listed twice)
DATASETS='*' | | 0 | start xent-*-feat=2
DATASETS=mnist | exit 3 | 1 | FAILED xent-mnist-feat=2 (exit 3): see ;1 run(s) failed: xent-mnist
"""


@pytest.mark.parametrize("row", ONE_RUN.strip().splitlines(), ids=lambda r: r.split(" | ")[0])
def test_reproduce_starts_one_run_as_listed_and_reports_it(tmp_path: Path, row: str) -> None:
    """One main.py command, with the dataset as listed, once in its log; failures reported."""
    words, body, code, lines = (cell.strip() for cell in row.split("|"))
    env = dict(DATA_DIR=str(tmp_path), DATASETS="digits", LOSSES="xent", FEAT_DIMS="2", JOBS="2")
    env |= dict(word.split("=", 1) for word in shlex.split(words))
    result, [command] = reproduce(tmp_path, env, body=body)
    assert result.returncode == int(code), result.stdout + result.stderr
    assert command[command.index("--dataset") + 1] == env["DATASETS"].split()[0]
    assert result.stdout.count("start ") == 1 and all(x in result.stdout for x in lines.split(";"))
    name = command[command.index("--name") + 1]
    assert (tmp_path / "runs" / f"{name}.log").read_text().count("== ") == 1


def test_reproduce_time_limit_stops_the_runs_with_sigterm_and_keeps_their_logs(tmp_path: Path):
    """TIME_LIMIT seconds after the start every run gets SIGTERM (main.py then saves a
    checkpoint), exit 124; the next call appends to the logs and starts the unfinished runs again
    (main.py resumes them)."""
    body = "trap 'echo term >> \"$CALLS.terms\"; exit 143' TERM\nsleep 20 &\nwait"
    env = dict(TIME_LIMIT="2", JOBS="2", DATASETS="digits", LOSSES="xent cent", FEAT_DIMS="2")
    for attempt in (1, 2):
        started = time.monotonic()
        result, _ = reproduce(tmp_path, env, body=body)
        assert result.returncode == 124 and time.monotonic() - started < 15, result
        assert "TIME_LIMIT (2 s) reached" in result.stdout and result.stdout.count("stopped ") == 2
        assert (tmp_path / "calls.terms").read_text() == "term\n" * 2 * attempt
    assert (tmp_path / "runs" / "xent-digits-feat=2.log").read_text().count("== ") == 2
