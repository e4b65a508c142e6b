"""Other systems and older torch: the run-folder lock without fcntl (Windows, simulated here), checkpoint dtypes."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import REPO

from checkpoints import LOCK_BYTE, RunFolderError, lock_run_dir, random_states, set_random_states


def test_lock_without_fcntl_uses_msvcrt_and_names_the_holder(tmp_path: Path, monkeypatch) -> None:
    """With `import fcntl` failing, lock_run_dir locks one byte past the pid with msvcrt.locking
    (non-blocking); a second lock of the folder is refused with the holder's pid, read from the file."""
    calls = []

    def locking(fd: int, mode: int, nbytes: int) -> None:
        # Stands in for Windows' byte-range lock: flock conflicts between two descriptors of one process.
        calls.append((os.lseek(fd, 0, os.SEEK_CUR), mode, nbytes))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OSError(errno.EACCES, "Permission denied") from None

    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` now raises ImportError
    monkeypatch.setitem(sys.modules, "msvcrt", types.SimpleNamespace(LK_NBLCK=2, locking=locking))
    fd = lock_run_dir(tmp_path)
    try:
        assert calls == [(LOCK_BYTE, 2, 1)]
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(
            RunFolderError, match=f"in use by process {os.getpid()}, a run still going"
        ):
            lock_run_dir(tmp_path)
        assert len(calls) == 2
    finally:
        os.close(fd)
    os.close(lock_run_dir(tmp_path))  # free again once the holder's descriptor is closed


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
    """A cap or a pin would downgrade a user's newer torch; every requirement is a `>=` minimum."""
    lines = [
        line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()
    ]
    requirements = [line for line in lines if line]
    assert requirements and all(
        re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+>=[0-9][0-9.]*", r) for r in requirements
    ), requirements


def test_reproduce_sh_needs_only_bash_3_2() -> None:
    """macOS ships bash 3.2: no associative arrays, no wait -n (used only where bash >= 4.3 runs), no ${!var} indirection, no mapfile, no case-changing
    expansions, and no bare "${array[@]}" of a possibly empty array under set -u (an error before bash 4.4)."""
    script = (REPO / "reproduce.sh").read_text()
    code = "\n".join(
        line.split(" #")[0] for line in script.splitlines() if not line.lstrip().startswith("#")
    )
    assert all(
        "BASH_VERSINFO" in line for line in code.splitlines() if "wait -n" in line
    )  # only where bash has it
    for feature in (
        "declare -A",
        "${!",
        "mapfile",
        "readarray",
        ",,}",
        "^^}",
        "|&",
        "&>>",
        'data[@]}" ',
    ):
        assert feature not in code, feature


def test_bench_times_cpu_without_the_resource_module(monkeypatch) -> None:
    """Windows has no `resource`: bench.py's CPU time falls back to this process's own."""
    import bench

    monkeypatch.setitem(sys.modules, "resource", None)  # import resource now raises ImportError
    before = bench.cpu_seconds()
    sum(i * i for i in range(200_000))
    assert 0 < bench.cpu_seconds() - before < 5
