"""One run, one folder: the run-folder lock, --overwrite under it, and run folders that cannot be used."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, listing, stderr_error_line, subprocess_env, write_finished_decoy

import checkpoints
import main
import utils
import visualize
from checkpoints import LOCK_FILE, PID_FILE, RunFolderError, lock_run_dir

QUICK = "--epochs 1 --train-samples 64 --batch-size 32 --model lenet++ --no-plots".split()


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process that takes run_dir's lock as main.py does and keeps it until killed."""
    code = f"import sys, time; sys.path.insert(0, {str(REPO)!r}); import checkpoints, pathlib\n"
    code += f"lock = checkpoints.lock_run_dir(pathlib.Path({str(run_dir)!r}))\n"
    code += "print('locked', flush=True); time.sleep(600)"
    env = subprocess_env()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=-1, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_and_an_overwrite_of_a_live_run_are_refused(tmp_path: Path, capsys) -> None:
    """While a run trains, the same command, with or without --overwrite, exits 1 with one line naming
    the folder and the live run's pid; the live run's files stay its own and it goes on."""
    argv = [*QUICK, "--epochs", "100", "--train-samples", "128"]
    argv += ["--out", str(tmp_path), "--name", "live"]
    command = [sys.executable, str(REPO / "main.py"), *argv]
    live = subprocess.Popen(
        command, cwd=REPO, stdout=-1, stderr=-1, text=True, env=subprocess_env()
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
                f"error: {run_dir} is in use by process {live.pid}, a run still going; "
                "choose another --name or --out"
            )
            assert (run_dir / "args.json").read_bytes() == args_before
            assert (run_dir / "checkpoint.pt").is_file()
        assert live.poll() is None, "the live run must go on"
    finally:
        live.send_signal(signal.SIGINT)
        _, err = live.communicate(timeout=120)
    # SIGINT in a step or between epochs (a loaded machine): either line says the checkpoint is saved
    assert live.returncode == 130 and re.search("checkpoint (is )?saved", err), err
    assert json.loads((run_dir / "args.json").read_text())["overwrite"] is False


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = hold_lock(run_dir)
    with pytest.raises(RunFolderError, match=f"is in use by process {holder.pid}"):
        lock_run_dir(run_dir)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    assert (run_dir / PID_FILE).read_text() == f"{holder.pid}\n"  # the file stays, its lock is gone
    lock = lock_run_dir(run_dir)
    try:
        assert (run_dir / PID_FILE).read_text() == f"{os.getpid()}\n"
    finally:
        lock.release()


def test_overwrite_that_cannot_delete_is_one_line_and_not_finished(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """A failed deletion is one line, exit 1; summary.json went first: the old run is not finished."""
    run_dir = write_finished_decoy(tmp_path / "old")
    (run_dir / "frames" / "train").mkdir(parents=True)

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(checkpoints.shutil, "rmtree", refuse)
    assert main.main([*QUICK, "--out", str(tmp_path), "--name", "old", "--overwrite"]) == 1
    line = stderr_error_line(capsys.readouterr().err)
    assert line.startswith(
        f"error: --overwrite cannot delete {run_dir / 'frames'} (Permission denied)"
    )
    assert "no summary.json" in line
    assert not (run_dir / "summary.json").exists()


def test_a_run_file_that_is_a_folder_is_refused_before_training(tmp_path: Path, capsys) -> None:
    """checkpoint.pt as a folder: refused at start (exit 2, nothing changed), not after an epoch;
    --overwrite deletes it with the old run."""
    run_dir = write_finished_decoy(tmp_path / "odd")
    (run_dir / "summary.json").unlink()
    (run_dir / "checkpoint.pt").unlink()
    (run_dir / "checkpoint.pt").mkdir()
    before = listing(tmp_path)
    with pytest.raises(SystemExit) as info:
        main.main([*QUICK, "--out", str(tmp_path), "--name", "odd"])
    assert info.value.code == 2
    want = f"{run_dir / 'checkpoint.pt'} is not a regular file; remove it, or use --overwrite"
    assert want in stderr_error_line(capsys.readouterr().err)
    assert listing(tmp_path) == before
    assert main.main([*QUICK, "--out", str(tmp_path), "--name", "odd", "--overwrite"]) == 0
    assert (run_dir / "checkpoint.pt").is_file() and (run_dir / "summary.json").is_file()


def test_a_lock_file_that_is_a_link_is_not_followed(tmp_path: Path) -> None:
    """A .lock planted as a link to a file elsewhere: refused, the file it points to left as it was."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    (run_dir / LOCK_FILE).symlink_to(precious)
    with pytest.raises(RunFolderError, match="cannot open the lock file"):
        lock_run_dir(run_dir)
    assert precious.read_text() == "keep me"


PRECIOUS = "keep me"


@pytest.mark.parametrize("planted", ["link", "dangling link", "stale file"])
def test_atomic_write_never_writes_through_its_temporary_name(tmp_path: Path, planted: str) -> None:
    """A link, dangling link or stale file at the temporary name is removed, not written through."""
    precious, path = tmp_path / "precious.txt", tmp_path / "run" / "args.json"
    path.parent.mkdir()
    precious.write_text(PRECIOUS)
    tmp = path.with_name(".args.json.tmp")
    if planted == "link":
        tmp.symlink_to(precious)
    elif planted == "dangling link":
        tmp.symlink_to(tmp_path / "created-elsewhere")
    else:
        tmp.write_text("half of an old write")
    utils.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and precious.read_text() == PRECIOUS
    assert not (tmp_path / "created-elsewhere").exists()
    assert [p.name for p in path.parent.iterdir()] == ["args.json"]


def test_links_planted_in_a_run_folder_are_not_followed(tmp_path: Path) -> None:
    """Links at every temporary name and as metrics.csv: the run resumes and finishes, and the file
    they point to is left as it was."""
    args = [*QUICK, "--out", str(tmp_path), "--name", "run"]
    assert main.main([*args, "--epochs", "1"]) == 0
    run_dir = tmp_path / "run"
    (run_dir / "summary.json").unlink()
    precious = tmp_path / "precious.txt"
    precious.write_text(PRECIOUS)
    for name in ("checkpoint.pt", "args.json", "metrics.csv", "summary.json"):
        (run_dir / f".{name}.tmp").symlink_to(precious)
    (run_dir / "metrics.csv").unlink()
    (run_dir / "metrics.csv").symlink_to(precious)  # replaced by the new one, not written through
    assert main.main([*args, "--epochs", "2"]) == 0
    assert precious.read_text() == PRECIOUS
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 2
    assert not list(run_dir.glob("*.tmp")) and not (run_dir / "metrics.csv").is_symlink()


def test_a_full_disk_at_the_lock_file_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    fail_writes(monkeypatch, PID_FILE, errno.ENOSPC)  # the disk fills up at the lock's pid file
    assert main.main([*QUICK, "--out", str(tmp_path), "--name", "run"]) == 1
    assert stderr_error_line(capsys.readouterr().err) == (
        f"error: cannot write {tmp_path / 'run' / PID_FILE} (No space left on device); "
        "free space or fix the folder and run the same command again"
    )


@pytest.mark.parametrize("folder", ["frames", "frames/train", "tensorboard"])
@pytest.mark.parametrize("kind", ["link", "file"])
def test_a_run_subfolder_that_is_a_link_or_a_file_is_refused(
    tmp_path: Path, capsys, folder: str, kind: str
) -> None:
    """frames or tensorboard as a link or a file: refused at start, exit 2, nothing changed; planted
    mid-run, the writer refuses it (WriteError) without writing through it."""
    run_dir = write_finished_decoy(tmp_path / "out" / "run")
    (run_dir / "summary.json").unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run_dir / folder).parent.mkdir(exist_ok=True)
    if kind == "link":
        (run_dir / folder).symlink_to(elsewhere)
    else:
        (run_dir / folder).write_text("a")
    before = listing(tmp_path)
    with pytest.raises(SystemExit) as info:
        main.main([*QUICK, "--out", str(tmp_path / "out"), "--name", "run"])
    assert info.value.code == 2
    assert stderr_error_line(capsys.readouterr().err).endswith(
        f"{run_dir / folder} is a link or not a folder; remove it, or use --overwrite to start the run again"
    )
    assert listing(tmp_path) == before
    if folder == "tensorboard":
        writer = lambda: visualize.log_frames_to_tensorboard(run_dir)  # noqa: E731
    else:
        writer = lambda: visualize.save_frame_data(  # noqa: E731
            run_dir, "train", 1, torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), None, "t"
        )
    with pytest.raises(utils.WriteError, match=f"{run_dir / folder} is a link or not a folder"):
        writer()
    assert not list(elsewhere.iterdir())


def fail_writes(monkeypatch, name: str, error: int) -> None:
    """Every atomic write of `name` fails at the rename, as on a full disk or a read-only folder."""
    replace = os.replace

    def failing(src, dst) -> None:
        if Path(dst).name == name:
            raise OSError(error, os.strerror(error))
        replace(src, dst)

    monkeypatch.setattr(utils.os, "replace", failing)


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory) -> Path:
    """A run of 1 epoch with plots, its summary.json removed: the next run of 2 epochs resumes it."""
    out = tmp_path_factory.mktemp("one-epoch")
    assert main.main([*QUICK[:-1], "--out", str(out), "--name", "run"]) == 0
    (out / "run" / "summary.json").unlink()
    return out / "run"


@pytest.mark.parametrize(
    "failing, error",
    [
        ("checkpoint.pt", errno.ENOSPC),
        ("metrics.csv", errno.EROFS),
        ("epoch_002.npz", errno.ENOSPC),
        ("epoch_001.png", errno.EROFS),
        ("summary.json", errno.ENOSPC),
    ],
)
def test_a_write_failure_mid_run_is_one_line_and_resumable(
    one_epoch, tmp_path, monkeypatch, capsys, failing, error
) -> None:
    """A full disk or read-only folder at any write of epoch 2 or of the end: exit 1, one line naming
    the file, no .tmp, no summary.json, the last checkpoint whole; the same command then finishes."""
    run_dir = Path(
        shutil.copytree(one_epoch, tmp_path / "run", ignore=shutil.ignore_patterns(".lock*"))
    )
    args = [*QUICK[2:-1], "--out", str(tmp_path), "--name", "run"]
    capsys.readouterr()
    fail_writes(monkeypatch, failing, error)
    assert main.main([*args, "--epochs", "2"]) == 1
    line = stderr_error_line(capsys.readouterr().err)
    assert line.startswith("error: cannot write ")
    assert line.endswith(
        f"{failing} ({os.strerror(error)}); free space or fix the folder and run the same command again"
    )
    assert not (run_dir / "summary.json").exists() and not list(run_dir.rglob("*.tmp"))
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == (2 if failing in ("epoch_001.png", "summary.json") else 1)
    monkeypatch.undo()
    assert main.main([*args, "--epochs", "2"]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 2


def test_a_name_the_terminal_cannot_encode_still_ends_done(tmp_path: Path, monkeypatch) -> None:
    """A run name with é printed to an ASCII stdout: the run finishes, exit 0, é escaped."""
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main.main([*QUICK, "--out", str(tmp_path), "--name", "café"]) == 0
    stdout.flush()
    assert "-> " + str(tmp_path / "caf\\xe9") in stdout.buffer.getvalue().decode("ascii")
    assert (tmp_path / "café" / "summary.json").is_file()


def test_sigterm_while_finishing_says_rerun_finishes(tmp_path: Path, monkeypatch, capsys) -> None:
    """SIGTERM while finish() draws the final pictures: exit 143, the line saying the checkpoint is saved."""
    args = [*QUICK, "--out", str(tmp_path), "--name", "cut"]
    args.remove("--no-plots")

    def terminated(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler raises in here

    def unhandled(signum, frame):  # what SIGTERM meets if main.py leaves it to the test process
        raise RuntimeError("SIGTERM was not handled by main.py")

    monkeypatch.setattr(visualize, "draw_frames", terminated)
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        assert main.main(args) == 143
        assert signal.getsignal(signal.SIGTERM) is unhandled  # main.py's handler is gone again
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert capsys.readouterr().err.strip() == (
        "interrupted while drawing the final pictures and writing summary.json; "
        "the checkpoint of epoch 1 is saved, run the same command to finish the run"
    )


def test_sigterm_while_frames_are_drawn_leaves_no_traceback(tmp_path: Path) -> None:
    """SIGTERM to main.py or to its process group (as systemd and timeout send it) while it draws
    the frames: exit 143, the one line, no traceback, no hang. Both at once."""
    procs = {}
    for target in ("process group", "main process"):
        argv = [*QUICK[:-1], "--out", str(tmp_path / target), "--name", "draw"]
        code = f"import sys, time; sys.path.insert(0, {str(REPO)!r}); import main, visualize\n"
        code += "def slow(*args):\n    print('drawing', flush=True)\n    time.sleep(60)\n"
        code += f"visualize.draw_frame = slow\nsys.exit(main.main({argv!r}))"
        command = [sys.executable, "-c", code]
        env = subprocess_env()
        procs[target] = subprocess.Popen(
            command, stdout=-1, stderr=-1, text=True, env=env, start_new_session=True
        )
    for target, proc in procs.items():
        for line in proc.stdout:
            if line.startswith("drawing"):
                break
        (os.killpg if target == "process group" else os.kill)(proc.pid, signal.SIGTERM)
    for proc in procs.values():
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 143, err
        end = "the checkpoint of epoch 1 is saved, run the same command to finish the run"
        assert err.strip().endswith(end), err
        assert "Traceback" not in err and "Error" not in err, err
