"""Windows: no fcntl there, so the run-folder lock takes msvcrt.locking (simulated here)."""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import types
from pathlib import Path

import pytest

from checkpoints import LOCK_BYTE, RunFolderError, lock_run_dir


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
        with pytest.raises(RunFolderError, match=f"in use by process {os.getpid()}, a run still going"):
            lock_run_dir(tmp_path)
        assert len(calls) == 2
    finally:
        os.close(fd)
    os.close(lock_run_dir(tmp_path))  # free again once the holder's descriptor is closed
