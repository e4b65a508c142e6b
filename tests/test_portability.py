"""Other systems, Pythons and torch versions: Windows rehearsed here, the declared Python minimum, checkpoint dtypes."""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, check_ok, subprocess_env
from PIL import Image

import main
import report
import visualize
from checkpoints import PID_FILE, random_states, set_random_states


@pytest.fixture(scope="module", autouse=True)
def importing():
    """A Python importing every module and test file with fcntl missing, started with the module's
    first test: the imports overlap the in-process tests."""
    code = "import importlib, pathlib, sys; sys.modules['fcntl'] = None; sys.path[:0] = ['.', 'tests']\n"
    code += "for p in [*pathlib.Path().glob('*.py'), *pathlib.Path('tests').glob('*.py')]:\n"
    code += "    importlib.import_module(p.stem)"
    command, env = [sys.executable, "-c", code], subprocess_env()
    with subprocess.Popen(command, cwd=REPO, stderr=-1, text=True, env=env) as proc:
        yield proc
        proc.kill()


@pytest.mark.filterwarnings("ignore:Failed to inspect CPU affinity")  # joblib misses it too
def test_windows_rehearsal(tmp_path: Path, monkeypatch, capsys) -> None:
    """The default command, a resume, visualize.py and report.py with what Windows lacks switched off: fcntl, O_NOFOLLOW,
    os.sched_getaffinity, and os.open of a folder (PermissionError, as Windows gives); every path given with a backslash.
    It cannot show Windows' own rules: here a backslash is a character of one folder name, so this shows only that the
    paths reach the file system as given (on Windows they separate folders); nor filelock's msvcrt locking."""
    real_open = os.open

    def windows_open(path, flags, *args, **kwargs):
        if os.path.isdir(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` now raises ImportError
    for name in ("O_NOFOLLOW", "sched_getaffinity"):
        monkeypatch.delattr(os, name, raising=False)
    monkeypatch.setattr(os, "open", windows_open)
    monkeypatch.chdir(tmp_path)
    out, run_dir = "runs\\win", tmp_path / "runs\\win" / "standalone-digits-feat=2"
    assert main.main(["--out", out, "--epochs", "1", "--train-samples", "128"]) == 0
    first = (run_dir / "metrics.csv").read_text().splitlines()
    (run_dir / "summary.json").unlink()  # unfinished now: the same command with more epochs resumes
    assert main.main(["--out", out, "--epochs", "2", "--train-samples", "128"]) == 0
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    rows = list(csv.DictReader(lines))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert lines[:2] == first and [r["epoch"] for r in rows] == ["1", "2"]  # epoch 1 kept
    assert summary["epochs"] == 2 and rows[1]["test_acc"] == f"{summary['acc']:.6g}"
    assert (run_dir / PID_FILE).read_text() == f"{os.getpid()}\n"
    assert visualize.main([str(Path(out, run_dir.name)), "--duration", "0.25"]) == 0
    with Image.open(run_dir / "train.gif") as gif:
        assert (gif.n_frames, gif.info["duration"]) == (2, 250)
    capsys.readouterr()
    assert report.main([out, "--collect", "collected\\sums"]) == 0
    cells = r"\|\s*standalone\s*\|\s*digits\s*\|\s*2\s*\|\s*" + f"{summary['acc']:.3f}" + r"\s*\|"
    assert re.search(cells, capsys.readouterr().out)
    collected = tmp_path / "collected\\sums" / f"{summary['name']}.json"
    assert json.loads(collected.read_text()) == summary
    assert sorted(os.listdir(tmp_path)) == ["collected\\sums", out]  # nothing written elsewhere


def run_python(code: str, *args: str) -> str:
    """`python -c CODE ARGS` in the repository root: its output, once it exits 0."""
    command = [sys.executable, "-c", code, *args]
    env = subprocess_env()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    return check_ok(proc).stdout


def test_every_module_imports_without_fcntl(importing: subprocess.Popen) -> None:
    """Windows has no fcntl: the project's modules and every test file import where `import fcntl` fails."""
    err = importing.communicate(timeout=300)[1]
    assert importing.returncode == 0, err[-3000:]


def test_the_code_needs_no_newer_python_than_declared() -> None:
    """vermin (pinned in requirements.txt) finds the oldest Python each file needs: the project's is the
    requires-python of pyproject.toml (as README says), and none needs a newer one."""
    pyproject = (REPO / "pyproject.toml").read_text()
    declared = re.search(r'requires-python = ">=(3\.\d+)"', pyproject)[1]
    patterns = ("*.py", "tests/*.py", "results/*/*.py")
    files = [str(p) for pattern in patterns for p in REPO.glob(pattern)]
    vermin = "import sys; from vermin.main import main; sys.exit(main())"
    out = run_python(vermin, f"-t={declared}-", "--no-tips", "--violations", *files)
    assert f"Minimum required versions: {declared}\n" in out, out[-3000:]


def test_random_states_are_saved_in_dtypes_every_supported_torch_saves(tmp_path: Path) -> None:
    """torch.save before 2.5 refuses uint32 tensors (numpy's state was one): the checkpoint's random states
    are uint8 tensors or None, and restoring them gives torch the same stream."""
    torch.manual_seed(3)
    states = random_states(torch.device("cpu"))
    assert states["torch"].dtype == torch.uint8 and states["cuda"] is None
    torch.save(states, tmp_path / "states.pt")
    expected = torch.rand(5)
    set_random_states(torch.load(tmp_path / "states.pt", weights_only=True), torch.device("cpu"))
    assert torch.equal(torch.rand(5), expected)


def test_requirements_give_minimums_only() -> None:
    """A cap or a pin would downgrade a user's newer torch: every requirement is a `>=` minimum, but for the two
    style tools, pinned because a new release may judge the same code otherwise."""
    text = (REPO / "requirements.txt").read_text()
    requirements = [line.split("#")[0].strip() for line in text.splitlines()]
    pattern = r"[A-Za-z0-9_.\-\[\]]+>=[0-9][0-9.]*|(ruff|vermin)==[0-9.]+"
    assert [r for r in requirements if r and not re.fullmatch(pattern, r)] == []
    assert any(requirements)


def test_reproduce_sh_needs_only_bash_3_2() -> None:
    """macOS ships bash 3.2: no associative arrays, no wait -n (used only where bash >= 4.3 runs), no ${!var} indirection, no mapfile, no case-changing
    expansions, and no bare "${array[@]}" of a possibly empty array under set -u (an error before bash 4.4)."""
    script = (REPO / "reproduce.sh").read_text()
    code = "\n".join(
        line.split(" #")[0] for line in script.splitlines() if not line.lstrip().startswith("#")
    )
    # only where bash has it
    assert all("BASH_VERSINFO" in line for line in code.splitlines() if "wait -n" in line)
    bash_4 = ["declare -A", "${!", "mapfile", "readarray", ",,}", "^^}", "|&", "&>>"]
    assert [feature for feature in [*bash_4, 'data[@]}" '] if feature in code] == []


def test_bench_times_cpu_without_the_resource_module(monkeypatch) -> None:
    """Windows has no `resource`: bench.py's CPU time falls back to this process's own."""
    import bench

    monkeypatch.setitem(sys.modules, "resource", None)  # import resource now raises ImportError
    before = bench.cpu_seconds()
    sum(i * i for i in range(200_000))
    assert 0 < bench.cpu_seconds() - before < 5
