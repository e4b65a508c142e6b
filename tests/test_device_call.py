"""device_call.py on the CPU: the rehearsal's two calls against the device tool's return contract, the
second continuing the first; the state archives; the refusals (one line, nothing changed or left)."""

from __future__ import annotations

import io
import os
import re
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import listing, stderr_error_line
from test_report import table_rows

import device_call

RUN = "cent-mnist-feat=2"


def test_rehearsal_brings_back_a_table_and_the_second_call_continues(
    tiny_mnist, tmp_path, monkeypatch
) -> None:
    """In this process, the CUDA tests stood in for by a one-line command (the first call alone runs
    them); each call's files kept to the device tool's limits, counted again here."""
    monkeypatch.setattr(device_call.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("PATH", os.environ["PATH"])  # the rehearsal puts its nvidia-smi first
    monkeypatch.setattr(device_call, "PYTEST", [sys.executable, "-c", "print('== 1 passed ==')"])
    out = tmp_path / "out"
    argv = ["rehearse", "--data-dir", str(tiny_mnist[0]), "--out", str(out), "--losses", "cent"]
    assert device_call.main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]  # no temporary folder left
    common = ["call.log", "runs.tar.gz", "state-1.tar", "table.md"]
    metrics = []
    for k, epochs, diff, progress in (
        (1, "1 of 2 (unfinished)", "/", "1 of 2 | +1, piece done | 143"),
        (2, "2", r"[+-]0\.\d{3}", "2 of 2 (finished) | +1, ended | 0"),
    ):
        call, files = out / f"call-{k}", common + ["cuda-tests.log"] * (k == 1)
        found = [p.relative_to(call) for p in call.rglob("*")]
        sizes = [(call / p).stat().st_size for p in found]
        assert sorted(map(str, found)) == sorted(files)  # plain names, no folder
        assert max(sizes) <= 16 * 2**20 and sum(sizes) <= 64 * 2**20
        log = (call / "call.log").read_text()
        assert ("tests/test_cuda.py: exit 0: 1 passed" in log) == (k == 1)
        table, runs = (call / "table.md").read_text().split("\n\n")
        [row] = table_rows(table)
        assert row[:3] == ["cent", "mnist", "2"] and row[5] == epochs
        assert re.fullmatch(diff, row[11])
        assert row[3].endswith(" (unfinished)") == (k == 1)
        assert f"| {RUN} | {progress} |" in runs
        with tarfile.open(call / "runs.tar.gz") as tar:
            metrics.append(tar.extractfile(f"runs/{RUN}/metrics.csv").read().splitlines())
            assert not [n for n in tar.getnames() if n.endswith(("checkpoint.pt", ".lock"))]
        with tarfile.open(call / "state-1.tar") as tar:  # what the next call continues from
            assert f"runs/{RUN}/checkpoint.pt" in tar.getnames()
    assert len(metrics[1]) == 3 and metrics[1][:2] == metrics[0]  # epoch 1 kept, epoch 2 added


def test_state_archives_first_fit_unpack_and_a_progress_row_without_epochs(tmp_path, monkeypatch):
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
    for part, group in (("state-1.tar", "ac"), ("state-2.tar", "bd")):
        with tarfile.open(state / part) as tar:
            want = [f"runs/{n}{end}" for n in group for end in ("", ".log", "/checkpoint.pt")]
            assert sorted(tar.getnames()) == sorted(want)
            assert sum(m.size for m in tar.getmembers()) <= 10_000
    [row] = device_call.progress(runs, {"a": (0, 143, "deadline")}, 35).splitlines()[2:]
    assert row == "| a | 0 of 35 | +0, deadline | 143 | / |"


def tar_of(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            (info := tarfile.TarInfo(name)).size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize(
    "argv, setup, message",
    [
        (["pack", "--data-dir", "{tmp}/none"], None, "MNIST/raw/train-images-idx3-ubyte not found"),
        (["unpack", "{tmp}/back"], b"junk", "state-1.tar: not a whole tar archive (file could"),
        (["unpack", "{tmp}/back"], {"../x": b"1"}, "'../x', not a plain path; nothing changed"),
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
):
    """Bad input and damaged archives: one line, exit 1, nothing in the state changed, no temporary left."""
    state, back = tmp_path / "state", tmp_path / "back"
    back.mkdir(), state.mkdir(), (tmp_path / "tmp").mkdir(), (tmp_path / "call-2").mkdir()
    tar_of(state / "mnist.tar.gz", {"MNIST/raw/x": b"1"})
    # a call continues from the damaged archive in the state; unpack reads the one that came back
    damaged = (state if argv[0] == "run" else back) / "state-1.tar"
    if isinstance(setup, bytes):
        damaged.write_bytes(setup)
    elif setup:
        tar_of(damaged, setup)
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setattr(device_call.tempfile, "tempdir", str(tmp_path / "tmp"))
    before = listing(state)
    argv = [a.format(tmp=tmp_path) for a in argv]
    argv += ["--state", str(state)] * ("--state" not in argv)
    assert device_call.main(argv) == 1
    assert message in stderr_error_line(capsys.readouterr().err)
    assert listing(state) == before and list((tmp_path / "tmp").iterdir()) == []
