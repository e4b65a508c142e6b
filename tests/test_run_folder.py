"""One run, one folder: the run-folder lock, --overwrite under it, and run folders that cannot be used."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, listing, stderr_error_line, subprocess_env, write_finished_decoy

import checkpoints
import main
from checkpoints import LOCK_FILE, RunFolderError, lock_run_dir

QUICK = ["--epochs", "1", "--train-samples", "64", "--batch-size", "32", "--model", "lenet++", "--no-plots"]


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process that takes run_dir's lock as main.py does and keeps it until killed."""
    code = f"import sys, time; sys.path.insert(0, {str(REPO)!r}); from pathlib import Path; from checkpoints import lock_run_dir; "
    code += f"lock_run_dir(Path({str(run_dir)!r})); print('locked', flush=True); time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=subprocess_env())
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_and_an_overwrite_of_a_live_run_are_refused(tmp_path: Path, capsys) -> None:
    """While a run trains, the same command, and the same command with --overwrite, exit 1 with one
    line naming the folder and the live run's pid; the live run's files stay its own and it goes on."""
    argv = ["--epochs", "100", "--train-samples", "128", "--batch-size", "32", "--model", "lenet++", "--no-plots"]
    argv += ["--out", str(tmp_path), "--name", "live"]
    live = subprocess.Popen(
        [sys.executable, str(REPO / "main.py"), *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    try:
        for line in live.stdout:
            if line.startswith("epoch 1/"):
                break
        run_dir = tmp_path / "live"
        args_before = (run_dir / "args.json").read_bytes()
        for extra in ([], ["--overwrite"]):
            assert main.main([*argv, *extra]) == 1
            line = stderr_error_line(capsys.readouterr().err)
            assert line == (
                f"error: {run_dir} is in use by process {live.pid}, a run still going; wait for it to end, stop it, or choose another --name"
            )
            assert (run_dir / "args.json").read_bytes() == args_before and (run_dir / "checkpoint.pt").is_file()
        assert live.poll() is None, "the live run must go on"
    finally:
        live.send_signal(signal.SIGINT)
        _, err = live.communicate(timeout=120)
    assert live.returncode == 130 and "checkpoint saved" in err
    assert json.loads((run_dir / "args.json").read_text())["overwrite"] is False


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = hold_lock(run_dir)
    with pytest.raises(RunFolderError, match=f"is in use by process {holder.pid}"):
        lock_run_dir(run_dir)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    assert (run_dir / LOCK_FILE).read_text().strip() == str(holder.pid)  # the file stays, its lock is gone
    fd = lock_run_dir(run_dir)
    try:
        assert (run_dir / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    finally:
        os.close(fd)


def test_overwrite_that_cannot_delete_is_one_line_and_not_finished(tmp_path: Path, monkeypatch, capsys) -> None:
    """A deletion that fails (as for a folder the user may not delete from) is one line, exit 1; summary.json
    goes first, so the half-deleted old run never looks finished."""
    run_dir = write_finished_decoy(tmp_path / "old")
    (run_dir / "frames" / "train").mkdir(parents=True)

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(checkpoints.shutil, "rmtree", refuse)
    assert main.main([*QUICK, "--out", str(tmp_path), "--name", "old", "--overwrite"]) == 1
    line = stderr_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: --overwrite cannot delete {run_dir / 'frames'} (Permission denied)") and "no summary.json" in line
    assert not (run_dir / "summary.json").exists()


def test_a_run_file_that_is_a_folder_is_refused_before_training(tmp_path: Path, capsys) -> None:
    """checkpoint.pt as a folder would fail only when the first epoch's checkpoint replaces it: refused at
    start (exit 2, nothing changed); --overwrite deletes it with the old run."""
    run_dir = write_finished_decoy(tmp_path / "odd")
    (run_dir / "summary.json").unlink()
    (run_dir / "checkpoint.pt").unlink()
    (run_dir / "checkpoint.pt").mkdir()
    before = listing(tmp_path)
    with pytest.raises(SystemExit) as info:
        main.main([*QUICK, "--out", str(tmp_path), "--name", "odd"])
    assert info.value.code == 2
    assert f"{run_dir / 'checkpoint.pt'} is not a regular file; remove it, or use --overwrite" in stderr_error_line(capsys.readouterr().err)
    assert listing(tmp_path) == before
    assert main.main([*QUICK, "--out", str(tmp_path), "--name", "odd", "--overwrite"]) == 0
    assert (run_dir / "checkpoint.pt").is_file() and (run_dir / "summary.json").is_file()


def test_a_lock_file_that_is_a_link_is_not_followed(tmp_path: Path) -> None:
    """A .lock planted as a link to a file elsewhere: refused, and the file it points to is left as it was."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    (run_dir / LOCK_FILE).symlink_to(precious)
    with pytest.raises(RunFolderError, match="cannot open the lock file"):
        lock_run_dir(run_dir)
    assert precious.read_text() == "keep me"
