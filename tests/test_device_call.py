"""device_call.py on the CPU: the rehearsal's two calls against the device tool's return contract, the
second continuing the first; the state archives; the refusals (one line, nothing changed or left)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import listing, stderr_error_line
from test_report import table_rows

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import device_call  # noqa: E402

MiB = 2**20


def assert_contract(out: Path) -> None:
    """The device tool's limits, counted again: 8 files of 16 MiB, 64 MiB in all, plain names, 2 folders down."""
    files = [p for p in out.rglob("*") if p.is_file()]
    sizes = [p.stat().st_size for p in files]
    assert len(files) <= 8 and max(sizes) <= 16 * MiB and sum(sizes) <= 64 * MiB, sizes
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in out.rglob("*"))
    assert all(len(p.relative_to(out).parts) <= 3 for p in files)


def member(archive: Path, name: str) -> str:
    with tarfile.open(archive) as tar:
        return tar.extractfile(name).read().decode()


def test_rehearsal_brings_back_a_table_and_the_second_call_continues(tiny_mnist, tmp_path) -> None:
    temp, out = tmp_path / "tmp", tmp_path / "out"
    temp.mkdir()
    rehearse = ["rehearse", "--data-dir", str(tiny_mnist[0]), "--out", str(out), "--losses", "cent"]
    result = subprocess.run(
        [sys.executable, "device_call.py", *rehearse],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(temp)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not list(temp.glob("device-*"))  # no temporary folder of its own left
    first, second = out / "call-1", out / "call-2"
    common = ["call.log", "runs.tar.gz", "state-1.tar", "table.md"]
    assert sorted(os.listdir(first)) == sorted(common + ["cuda-tests.log"])
    assert sorted(os.listdir(second)) == common  # the CUDA tests: first call only
    for call, epochs, acc_end, diff, progress in (
        (first, "1 of 2 (unfinished)", " (unfinished)", "/", "1 of 2 | +1, piece done | 143"),
        (second, "2", "", r"[+-]0\.\d{3}", "2 of 2 (finished) | +1, ended | 0"),
    ):
        assert_contract(call)
        table, runs = (call / "table.md").read_text().split("\n\n")
        [row] = table_rows(table)
        assert row[:3] == ["cent", "mnist", "2"] and row[5] == epochs
        assert row[3].endswith(acc_end) and re.fullmatch(diff, row[11])
        assert f"| cent-mnist-feat=2 | {progress} |" in runs
    metrics = [
        member(call / "runs.tar.gz", "runs/cent-mnist-feat=2/metrics.csv").splitlines()
        for call in (first, second)
    ]
    assert len(metrics[1]) == 3 and metrics[1][:2] == metrics[0]  # epoch 1 kept, epoch 2 added
    with tarfile.open(second / "state-1.tar") as tar:
        assert "runs/cent-mnist-feat=2/checkpoint.pt" in tar.getnames()
    with tarfile.open(second / "runs.tar.gz") as tar:
        assert not [n for n in tar.getnames() if n.endswith(("checkpoint.pt", ".lock"))]


def test_state_archives_are_filled_first_fit_and_unpack_replaces_the_old(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(device_call, "PART", 10_000)
    runs, out, state = tmp_path / "runs", tmp_path / "out", tmp_path / "state"
    sizes = {"a": 6000, "b": 5000, "c": 3900, "d": 3000}  # .lock: 1 byte more each
    for name, size in sizes.items():
        (runs / name).mkdir(parents=True)
        (runs / name / "checkpoint.pt").write_bytes(os.urandom(size))
        (runs / name / ".lock").write_text("1")
        (runs / f"{name}.log").write_text(name)
    out.mkdir(), state.mkdir()
    (state / "state-3.tar").write_text("the last call's")
    device_call.archive(runs, list(sizes), out)
    device_call.unpack(out, state)
    assert sorted(os.listdir(state)) == ["state-1.tar", "state-2.tar"]
    for part, names in (("state-1.tar", "ac"), ("state-2.tar", "bd")):
        with tarfile.open(state / part) as tar:
            assert sorted(tar.getnames()) == sorted(
                f"runs/{n}{end}" for n in names for end in ("", ".log", "/checkpoint.pt")
            )
            assert sum(m.size for m in tar.getmembers()) <= 10_000


def test_progress_has_a_row_for_a_run_without_an_epoch(tmp_path) -> None:
    (tmp_path / "cent-mnist-feat=2").mkdir()  # stopped before its first epoch ended
    status = {"cent-mnist-feat=2": (0, 143, "deadline")}
    assert device_call.progress(tmp_path, status, 35).splitlines()[2:] == [
        "| cent-mnist-feat=2 | 0 of 35 | +0, deadline | 143 | / |"
    ]


def tar_of(path: Path, names: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in names.items():
            (info := tarfile.TarInfo(name)).size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize(
    "argv, setup, message",
    [
        (["pack", "--data-dir", "{tmp}/none"], None, "MNIST/raw/train-images-idx3-ubyte not found"),
        (
            ["unpack", "{tmp}/back"],
            b"junk",
            "back/state-1.tar: not a whole tar archive (file could",
        ),
        (["unpack", "{tmp}/back"], {"../x": b"1"}, "holds '../x', not a plain path inside it"),
        (["unpack", "{tmp}/back"], {"/etc/x": b"1"}, "holds '/etc/x', not a plain path"),
        (["unpack", "{tmp}"], None, "no state-*.tar, the files a call brings back"),
        (["run"], None, "set OUT (or --out) to the existing folder"),
        (["run", "--out", "{tmp}/back", "--state", "{tmp}"], None, "mnist.tar.gz not found"),
        (["run", "--out", "{tmp}/back"], b"", "state/state-1.tar: not a whole tar archive"),
        (["rehearse", "--out", "{tmp}"], None, "holds call-1 or call-2 already"),
    ],
)
def test_refusals_are_one_line_and_change_nothing(
    argv, setup, message, tmp_path, monkeypatch, capsys
) -> None:
    """Bad input and damaged archives: one line, exit 1, nothing in the state changed, no temporary left."""
    state, back = tmp_path / "state", tmp_path / "back"
    back.mkdir(), state.mkdir(), (tmp_path / "tmp").mkdir()
    tar_of(state / "mnist.tar.gz", {"MNIST/raw/x": b"1"})
    (tmp_path / "call-2").mkdir()
    if argv[0] == "run":  # the damaged archive is the one the call would continue from
        (state / "state-1.tar").write_bytes(setup) if setup is not None else None
    elif isinstance(setup, bytes):
        (back / "state-1.tar").write_bytes(setup)
    elif setup:
        tar_of(back / "state-1.tar", setup)
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setattr(device_call.tempfile, "tempdir", str(tmp_path / "tmp"))
    before = listing(state)
    argv = [a.format(tmp=tmp_path) for a in argv] + ["--state", str(state)] * (
        "--state" not in argv
    )
    assert device_call.main(argv) == 1
    assert message in stderr_error_line(capsys.readouterr().err)
    assert listing(state) == before and list((tmp_path / "tmp").iterdir()) == []
