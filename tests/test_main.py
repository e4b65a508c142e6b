"""main.py end to end: tiny runs in subprocesses, their files, accuracy, refusals and bad input."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    MNIST_TEST,
    MNIST_TRAIN,
    REAL_TRAIN_SAMPLES,
    check_ok,
    listing,
    stderr_error_line,
    subprocess_env,
    write_finished_decoy,
    write_idx,
    write_image_tree,
    write_tiny_mnist,
)

import batches
import config
import distributed
import main
from datasets import channel_stats, load_dataset
from models import build_model
from utils import write_json

LOSS_TERMS = {"xent": {"xent"}, "cent": {"xent", "intra"}, "standalone": {"intra", "inter"}}


def read_metrics(run_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def model_outputs(
    run_dir: Path, ckpt: dict, args: dict
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Test-set features, logits and labels recomputed from the checkpoint's model (eval mode, no augmentation)."""
    data = load_dataset(args["dataset"], args["data_dir"], download=False)
    model = build_model(
        args["model"], data.channels, len(data.classes), args["feat_dim"], data.image_size
    )
    model.load_state_dict(ckpt["model"])
    model.eval()
    x = data.test.images.float() / 255
    if args["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        features, logits = model(x)
    return features, logits, data.test.labels


# ------------------------------------------------------------------------------- the tiny runs


@pytest.mark.parametrize("loss", ["xent", "cent", "standalone"])
def test_tiny_run_files(tiny_runs, background, loss):
    run_dir = tiny_runs[loss]
    assert run_dir.name == f"{loss}-mnist-feat=2"
    for name in ("args.json", "metrics.csv", "checkpoint.pt", "summary.json"):
        assert (run_dir / name).is_file(), name

    args = json.loads((run_dir / "args.json").read_text())
    assert (
        args["loss"] == loss
        and args["dataset"] == "mnist"
        and args["feat_dim"] == 2
        and args["epochs"] == 2
    )
    assert args["model"] == "resnet" and args["data_dir"] == str(background.paths["mnist"])

    header, rows = read_metrics(run_dir)
    assert header == main.COLUMNS
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        for split in ("train", "test"):
            for term in ("xent", "intra", "inter"):
                value = row[f"{split}_{term}"]
                if term in LOSS_TERMS[loss]:
                    assert math.isfinite(float(value)), (split, term, value)
                else:
                    assert value == "", (split, term, value)
        filled = [c for c in main.COLUMNS if row[c] != ""]
        assert all(math.isfinite(float(row[c])) for c in filled)
        for acc in ("train_acc", "test_acc", "ncm_acc"):
            assert 0 <= float(row[acc]) <= 1
        assert (row["center_acc"] == "") == (loss == "xent")
        assert float(row["lr"]) == pytest.approx(0.01)
        assert int(row["bad_steps"]) == 0 and float(row["seconds"]) > 0
        # The reported loss is the weighted sum of its terms (averaged over the same batches).
        if loss == "xent":
            assert float(row["train_loss"]) == pytest.approx(float(row["train_xent"]), rel=1e-4)
            assert float(row["test_loss"]) == pytest.approx(float(row["test_xent"]), rel=1e-4)
        elif loss == "cent":
            assert float(row["test_loss"]) == pytest.approx(
                float(row["test_xent"]) + float(row["test_intra"]), rel=1e-4
            )
        else:
            assert float(row["test_loss"]) == pytest.approx(
                float(row["test_intra"]) + 0.1 * float(row["test_inter"]), rel=1e-4, abs=1e-5
            )
            assert float(row["test_inter"]) <= 0

    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert "model" in ckpt and "objective" in ckpt
    assert ckpt["epoch"] == 2
    if loss == "xent":
        assert "criterion.centers" not in ckpt["objective"]
    else:
        assert ckpt["objective"]["criterion.centers"].shape == (10, 2)

    summary = json.loads((run_dir / "summary.json").read_text())
    accs = [float(r["test_acc"]) for r in rows]
    assert summary["acc"] == pytest.approx(accs[-1], rel=1e-5)
    assert summary["best_acc"] == pytest.approx(max(accs), rel=1e-5)
    assert summary["epochs"] == 2
    assert summary["samples_per_second"] > 0
    assert (
        summary["train_size"] == MNIST_TRAIN
        and summary["test_size"] == MNIST_TEST
        and summary["num_classes"] == 10
    )
    assert summary["ncm_acc"] == pytest.approx(float(rows[-1]["ncm_acc"]), rel=1e-5)
    assert summary["loss"] == loss and summary["name"] == run_dir.name
    raw = background.paths["mnist"] / "MNIST" / "raw"
    assert summary["data_source"] == f"IDX files in {os.path.relpath(raw, run_dir)}"
    assert [(run_dir / f).resolve().parent for f in summary["data_files"]] == [raw.resolve()] * 4


def test_standalone_accuracy_is_nearest_center(tiny_runs):
    """The study's evaluation: each test sample goes to the nearest learned center."""
    run_dir = tiny_runs["standalone"]
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    args = json.loads((run_dir / "args.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    features, _, labels = model_outputs(run_dir, ckpt, args)
    centers = ckpt["objective"]["criterion.centers"]
    distances = ((features[:, None, :] - centers[None, :, :]) ** 2).sum(-1)  # plain, no expansion
    predictions = distances.argmin(1)
    acc = (predictions == labels).float().mean().item()
    assert summary["acc"] == pytest.approx(acc, abs=1e-6), (
        f"summary acc {summary['acc']}, nearest-center acc {acc}"
    )
    assert summary["center_acc"] == pytest.approx(acc, abs=1e-6)
    _, rows = read_metrics(run_dir)
    assert float(rows[-1]["test_acc"]) == pytest.approx(acc, abs=1e-5)
    # Guard against a vacuous check: a run whose features collapsed onto one center would give
    # chance accuracy whichever way it was computed.
    assert len(set(predictions.tolist())) > 1, "all test samples share one nearest center"


@pytest.mark.parametrize("loss", ["xent", "cent"])
def test_softmax_accuracy_is_argmax(tiny_runs, loss):
    run_dir = tiny_runs[loss]
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    args = json.loads((run_dir / "args.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    _, logits, labels = model_outputs(run_dir, ckpt, args)
    acc = (logits.argmax(1) == labels).float().mean().item()
    assert summary["acc"] == pytest.approx(acc, abs=1e-6)


# ------------------------------------------------------------- --name, --out, refusal, --overwrite


def test_name_and_out_are_honoured(named_run):
    _, run_dir = named_run
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["my run"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["name"] == "my run" and summary["model"] == "lenet++"
    assert summary["train_size"] == 32 and summary["epochs"] == 1
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["objective"]["criterion.centers"].shape == (10, 2)
    assert not (run_dir / "frames").exists()  # --no-plots


def test_finished_run_refused_then_overwritten(named_run, capsys):
    command, run_dir = named_run
    before = (run_dir / "summary.json").read_bytes()
    argv = list(map(str, command))
    with pytest.raises(SystemExit) as info:  # the same command again
        main.main(argv)
    assert info.value.code == 2
    line = stderr_error_line(capsys.readouterr().err)
    assert "finished run" in line and "--overwrite" in line
    assert (run_dir / "summary.json").read_bytes() == before

    marker = run_dir / "stale.txt"
    marker.write_text("from the old run")
    assert main.main([*argv, "--overwrite", "--device", "cpu"]) == 0
    assert not marker.exists(), "--overwrite must replace the old run folder"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["overwrite"] is True
    _, rows = read_metrics(run_dir)
    assert len(rows) == 1
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".lock",
        ".lock.pid",
        "args.json",
        "checkpoint.pt",
        "metrics.csv",
        "summary.json",
    ]


@pytest.mark.parametrize("loss", ["xent", "cent", "standalone"])
def test_lenet_smoke_run_with_its_recipe(lenet_runs, background, loss):
    run_dir = lenet_runs[loss]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (
        summary["model"],
        summary["loss"],
        summary["weight_decay"],
        summary["clip_grad_norm"],
    ) == ("lenet++", loss, 5e-4, 10.0)
    assert summary["bad_steps"] == 0 and math.isfinite(summary["acc"])
    _, rows = read_metrics(run_dir)
    assert len(rows) == 1 and math.isfinite(float(rows[0]["train_loss"]))
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    mean, std = channel_stats(
        load_dataset("mnist", background.paths["mnist"], download=False).train.images[:64]
    )
    assert ckpt["model"]["mean"].flatten().tolist() == pytest.approx(mean) and ckpt["model"][
        "std"
    ].flatten().tolist() == pytest.approx(std)


# ---------------------------------------------------------------------------------- bad input


# Every float flag, each with NaN or an infinity (comparisons with NaN are false: range checks alone let it pass).
NOT_FINITE = [
    ("--lr", "inf"),
    ("--lr", "-inf"),
    ("--lr-cent", "nan"),
    ("--momentum", "nan"),
    ("--weight-cent", "inf"),
]
NOT_FINITE += [
    ("--weight-intra", "nan"),
    ("--weight-inter", "nan"),
    ("--inter-margin", "inf"),
    ("--alpha", "nan"),
]
NOT_FINITE += [("--factor", "nan"), ("--threshold", "inf"), ("--val-fraction", "nan")]
NOT_FINITE += [("--weight-decay", "nan"), ("--clip-grad-norm", "inf"), ("--center-alpha", "nan")]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--loss", "softmax"], "argument --loss: invalid choice: 'softmax'"),
        (["--dataset", "imagenet"], "argument --dataset: invalid choice: 'imagenet'"),
        (["--feat-dim", "0"], "--feat-dim must be at least 1"),
        (["--batch-size", "1"], "--batch-size must be at least 2"),
        (["--lr", "-1"], "--lr must be positive"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--momentum", "1.5"], "--momentum must be in [0, 1)"),
        (["--weight-inter", "-0.1"], "loss weights must not be negative"),
        (
            ["--loss", "cent", "--weight-cent", "1e30"],
            "loss weights above 1e+06 make the first steps' gradients overflow float32",
        ),
        (["--plot-every", "0"], "--plot-every must be at least 1"),
        (
            ["--data-dir", "/nonexistent/scl-data"],
            "--data-dir /nonexistent/scl-data does not exist",
        ),
        (["--dataset", "folder"], "--dataset folder needs --data-dir"),
        (["--seed", "-1"], "--seed must be an integer from 0 to 4294967295"),
        (["--seed", str(2**32)], "--seed must be an integer from 0 to 4294967295"),
        *[
            ([f"{flag}={value}"], f"argument {flag}: must be a finite number, not '{value}'")
            for flag, value in NOT_FINITE
        ],
        (["--lr", "fast"], "argument --lr: not a number: 'fast'"),
        # Zero, subnormal or infinite in float32, in which training computes: it would learn nothing and end "done".
        *[
            (
                [*extra, f"{flag}={value}"],
                f"argument {flag}: '{value}' is outside float32's normal range, 1.18e-38 to 3.4e+38 in size",
            )
            for extra, flag, value in [
                ((), "--lr", "1e-300"),
                (("--loss", "xent"), "--lr", "1e-45"),
                (("--loss", "cent"), "--lr", "1e-39"),
                ((), "--lr", "1e39"),
                ((), "--weight-inter", "1e-300"),
                (("--loss", "cent"), "--weight-cent", "-1e-40"),
                ((), "--lr-cent", "1e-300"),
                (("--center-update", "paper"), "--center-alpha", "1e-300"),
                ((), "--inter-margin", "1e-300"),
            ]
        ],
        # Plot flags where nothing they set is drawn.
        (
            ["--no-plots", "--projection", "tsne"],
            "--projection is for --feat-dim 3 or more with plots; drop it",
        ),
        (["--projection", "tsne"], "--projection is for --feat-dim 3 or more with plots; drop it"),
        (
            ["--feat-dim", "8", "--no-plots", "--projection", "pca"],
            "--projection is for --feat-dim 3 or more with plots; drop it",
        ),
        (
            ["--no-plots", "--plot-every", "3"],
            "--plot-every is for --feat-dim 2 with plots; drop it",
        ),
        (
            ["--feat-dim", "8", "--plot-every", "3"],
            "--plot-every is for --feat-dim 2 with plots; drop it",
        ),
        (["--device", "meta"], "--device meta: not a device to train on"),
        (
            ["--device", "mps"],
            "--device mps: MPS is not supported (its mixed-precision step is unsafe",
        ),
        pytest.param(
            ["--device", "cuda"],
            "--device cuda: CUDA is not available here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here"),
        ),
        (["--name", ""], "--name '' must be one plain folder name"),
        (["--name", ".."], "--name '..' must be one plain folder name"),
        (["--resume", "--overwrite"], "--resume continues a run and --overwrite deletes it"),
        (["--out", "{tmp}/a-file"], "is a file, not a folder"),
        (["--out", "{tmp}/a-file/runs"], "is a file, not a folder"),
        (["--out", "/proc/self/runs"], "lies under /proc, a kernel file system"),
        (["--out", "/sys/runs"], "lies under /sys, a kernel file system"),
        pytest.param(
            ["--out", "{tmp}/read-only/runs"],
            "is not writable",
            marks=pytest.mark.skipif(
                os.geteuid() == 0, reason="root may write into a read-only folder"
            ),
        ),
        (["--weight-decay", "-1"], "--weight-decay must not be negative"),
        (["--clip-grad-norm", "-1"], "--clip-grad-norm must not be negative"),
        (
            ["--loss", "xent", "--center-update", "paper"],
            "--center-update paper needs --loss cent or standalone, whose centers only",
        ),
        (
            ["--loss", "centers-apart", "--center-update", "paper"],
            "(centers-apart moves its centers by terms of its own)",
        ),
        (
            ["--center-alpha", "0.5"],
            "--center-alpha is the rate of the paper's center update; add --center-update paper",
        ),
        (["--center-update", "paper", "--center-alpha", "1.5"], "--center-alpha must be in (0, 1]"),
        (
            ["--center-update", "paper", "--lr-cent", "0.1"],
            "with --center-update paper set --center-alpha instead",
        ),
        # Flags the chosen loss or pipeline does not use (given, not defaulted).
        (
            ["--loss", "standalone", "--weight-cent", "1"],
            "--weight-cent is used by --loss cent, not by --loss standalone; drop it",
        ),
        (
            ["--loss", "xent", "--lr-cent", "0.1"],
            "--lr-cent is used by every loss but xent (the losses with centers), not by --loss xent",
        ),
        (
            ["--loss", "xent", "--inter-margin", "2"],
            "--inter-margin is used by --loss standalone, not by --loss xent",
        ),
        (
            ["--loss", "centers-apart", "--inter-margin", "2"],
            "--inter-margin is used by --loss standalone, not by --loss centers-apart",
        ),
        (
            ["--loss", "xent", "--alpha", "0.1"],
            "--alpha is used by --loss centers-apart, not by --loss xent",
        ),
        (
            ["--loss", "standalone", "--alpha", "0.1"],
            "--alpha is used by --loss centers-apart, not by --loss standalone",
        ),
        (
            ["--loss", "xent", "--weight-inter", "0.1"],
            "--weight-inter is used by --loss standalone and centers-apart, not by --loss xent",
        ),
        (
            ["--loss", "cent", "--weight-intra", "1"],
            "--weight-intra is used by --loss standalone and centers-apart, not by --loss cent",
        ),
        (
            ["--workers", "2"],
            "--workers sets the DataLoader processes of --pipeline loader; drop it",
        ),
        # A loss that is zero whatever the model does would train nothing and still end "done".
        (
            ["--weight-intra", "0", "--weight-inter", "0"],
            "--weight-intra 0 and --weight-inter 0 make the standalone loss zero",
        ),
        (
            ["--loss", "centers-apart", "--weight-intra", "0", "--weight-inter", "0"],
            "make the centers-apart loss zero",
        ),
        # Names the file system cannot hold, and an empty --out (it meant the current folder).
        (["--name", "n" * 256], "--name is 256 bytes long, more than the 255 a file name may have"),
        (
            ["--out", "{tmp}/" + "o" * 256 + "/runs"],
            "is 256 bytes long, more than the 255 a file system allows",
        ),
        (["--out", ""], "--out must not be empty"),
        (["--out", "{tmp}/loop/runs"], "--out {tmp}/loop/runs: a loop of symbolic links"),
        (["--out", "{tmp}/runs "], "--out '{tmp}/runs ' starts or ends with whitespace"),
        (["--name", " run"], "--name ' run' starts or ends with whitespace"),
        (
            ["--out", "{tmp}/" + "/".join(["d" * 200] * 20)],
            "make a run folder path longer than 3996 bytes",
        ),
    ],
)
def test_bad_arguments_exit_2(argv, message, tmp_path, capsys):
    """Every bad argument: exit 2, one line naming the flag, nothing written anywhere."""
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "read-only").mkdir(mode=0o500)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    before = listing(tmp_path)
    with pytest.raises(SystemExit) as info:
        main.main(
            ["--out", str(tmp_path / "out"), *(a.replace("{tmp}", str(tmp_path)) for a in argv)]
        )
    assert info.value.code == 2
    line = stderr_error_line(capsys.readouterr().err)
    assert message.replace("{tmp}", str(tmp_path)) in line
    assert listing(tmp_path) == before


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--name", "", "--overwrite"], "--name '' must be one plain folder name"),
        (["--name", "..", "--overwrite"], "--name '..' must be one plain folder name"),
        (["--name", ".", "--overwrite"], "--name '.' must be one plain folder name"),
        (["--name", "decoy/..", "--overwrite"], "--name 'decoy/..' must be one plain folder name"),
        (
            ["--name", "decoy", "--overwrite", "--resume"],
            "--resume continues a run and --overwrite deletes it",
        ),
        (["--name", "decoy"], "holds a finished run; use --overwrite"),
        (["--name", "notes", "--overwrite"], "is not a run folder of main.py"),
        (["--name", "notes"], "is not a run folder of main.py"),
        (["--name", "a-file", "--overwrite"], "exists and is not a folder"),
        (["--name", "link", "--overwrite"], "exists and is not a folder"),
        (
            ["--out", "{out}/decoy", "--name", "checkpoint.pt", "--overwrite"],
            "exists and is not a folder",
        ),
    ],
)
def test_nothing_outside_the_run_folder_is_deleted_or_written(argv, message, tmp_path, capsys):
    """--name and --overwrite can only ever replace one run folder that main.py made: beside a decoy
    finished run, a folder of someone's notes, a file and a link, each of these is refused with one
    line, exit 2, and the whole tree (the parent of --out included) stays as it was."""
    out = tmp_path / "out"
    decoy = write_finished_decoy(out / "decoy")
    (out / "notes").mkdir()
    (out / "notes" / "todo.txt").write_text("precious")
    (out / "a-file").write_text("a file")
    (out / "link").symlink_to(decoy)
    (tmp_path / "beside-out.txt").write_text("also precious")
    before = listing(tmp_path)
    with pytest.raises(SystemExit) as info:
        main.main(
            [
                "--out",
                str(out),
                "--epochs",
                "1",
                "--train-samples",
                "64",
                "--batch-size",
                "32",
                *(a.replace("{out}", str(out)) for a in argv),
            ]
        )
    assert info.value.code == 2
    assert message in stderr_error_line(capsys.readouterr().err)
    assert listing(tmp_path) == before


def test_bad_data_dir_subprocess(bad_data_dir_run):
    proc = bad_data_dir_run
    assert proc.returncode == 2
    line = stderr_error_line(proc.stderr)
    assert line == "main.py: error: --data-dir /nonexistent does not exist or is not a folder"
    assert proc.stdout == ""


def test_truncated_idx_subprocess(truncated_run):
    proc, bad, out = truncated_run
    assert proc.returncode == 1, proc.stderr
    line = stderr_error_line(proc.stderr)
    assert str(bad) in line and "truncated" in line
    assert not list(out.glob("**/summary.json"))


def test_non_image_in_tree(tmp_path, capsys):
    root = write_image_tree(tmp_path / "tree", "RGB", 32, per_class=(2, 1))
    bad = root / "train" / "bee" / "x.png"
    bad.write_bytes(b"\x89PNG but not really" * 4)
    out = tmp_path / "out"
    assert (
        main.main(
            ["--dataset", "folder", "--data-dir", str(root), "--epochs", "1", "--out", str(out)]
        )
        == 1
    )
    line = stderr_error_line(capsys.readouterr().err)
    assert str(bad) in line
    assert not list(out.glob("**/summary.json"))


@pytest.mark.parametrize(("model", "side", "smallest"), [("lenet++", 6, 8), ("resnet", 2, 3)])
def test_images_too_small_for_the_model_are_one_line(tmp_path, capsys, model, side, smallest):
    """A model that cannot take the data set's image size says so before making a run folder."""
    root = write_image_tree(tmp_path / "tree", "L", side, per_class=(4, 2))
    out = tmp_path / "out"
    argv = [
        "--dataset",
        "folder",
        "--data-dir",
        str(root),
        "--model",
        model,
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--out",
        str(out),
    ]
    with pytest.raises(SystemExit) as info:
        main.main(argv)
    assert info.value.code == 2
    line = stderr_error_line(capsys.readouterr().err)
    assert (
        f"--model {model} needs images of at least {smallest}x{smallest}" in line
        and f"has {side}x{side}" in line
    )
    assert not out.exists()


def test_a_model_too_large_for_memory_is_one_line(tmp_path, capsys):
    """2**40 features make a 512 TiB layer, beyond any address space: one line, exit 1, no summary."""
    out = tmp_path / "out"
    assert main.main(["--feat-dim", str(2**40), "--epochs", "1", "--out", str(out)]) == 1
    line = stderr_error_line(capsys.readouterr().err)
    assert line.startswith("error: out of memory") and "--batch-size or --feat-dim" in line
    assert not list(out.glob("**/summary.json"))


def test_overwrite_keeps_an_empty_folder_it_did_not_make(tmp_path):
    """--overwrite deletes only main.py's run folders: an empty folder of someone else's (here with the
    sticky bit of a shared /tmp) is reused as it is, not deleted and recreated."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    argv = [
        "--out",
        str(tmp_path),
        "--name",
        "shared",
        "--overwrite",
        "--epochs",
        "1",
        "--train-samples",
        "32",
        "--batch-size",
        "32",
    ]
    assert main.main([*argv, "--model", "lenet++", "--no-plots"]) == 0
    assert (shared.stat().st_mode & 0o7777) == 0o1777
    assert (shared / "summary.json").is_file()


@pytest.mark.parametrize(
    "argv,code,message",
    [
        (
            ["--dataset", "mnist", "--data-dir", "{empty_idx}"],
            1,
            "train-images-idx3-ubyte: an IDX file of no items",
        ),
        (
            ["--train-samples", "4", "--val-fraction", "0.9"],
            2,
            "the train set has 0 samples, fewer than one batch",
        ),
        (
            ["--train-samples", "20"],
            2,
            "the train set has 20 samples, fewer than one batch of --batch-size 32",
        ),
    ],
)
def test_bad_data_one_line(argv, code, message, tmp_path, capsys):
    """Data that cannot train: one line, exit 1 (data) or 2 (arguments), no run folder."""
    empty_idx = tmp_path / "empty-idx"
    write_tiny_mnist(empty_idx)
    # a valid header, 0 images
    write_idx(
        empty_idx / "MNIST" / "raw" / "train-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8)
    )
    write_idx(empty_idx / "MNIST" / "raw" / "train-labels-idx1-ubyte", np.zeros(0, np.uint8))
    before = listing(tmp_path)
    argv = [a.replace("{empty_idx}", str(empty_idx)) for a in argv]
    try:
        result = main.main(
            [*argv, "--batch-size", "32", "--epochs", "1", "--out", str(tmp_path / "out")]
        )
    except SystemExit as exc:
        result = exc.code
    assert result == code
    assert message in stderr_error_line(capsys.readouterr().err)
    assert listing(tmp_path) == before


def test_a_train_set_of_one_class_is_refused(tmp_path, capsys):
    """The first 4 train images of this tiny MNIST are all of class 7 (after --train-samples 4): nothing to tell apart."""
    data = tmp_path / "data"
    arrays = write_tiny_mnist(data)
    labels = arrays["train_labels"].copy()
    labels[:4] = 7
    write_idx(data / "MNIST" / "raw" / "train-labels-idx1-ubyte", labels)
    argv = [
        "--dataset",
        "mnist",
        "--data-dir",
        str(data),
        "--train-samples",
        "4",
        "--batch-size",
        "2",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main.main(argv) == 1
    line = stderr_error_line(capsys.readouterr().err)
    assert line.endswith(
        "the train set has only the class '7' in its first --train-samples 4; a classifier needs at least two"
    )
    assert not (tmp_path / "out").exists()


def test_train_set_smaller_than_knn_k(tmp_path):
    """--train-samples 8 leaves a k-NN gallery of 8 train features: knn10_acc uses k = 8 instead of failing."""
    out = tmp_path / "out"
    assert (
        main.main(
            [
                "--train-samples",
                "8",
                "--batch-size",
                "8",
                "--epochs",
                "1",
                "--model",
                "lenet++",
                "--no-plots",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    summary = json.loads((out / "standalone-digits-feat=2" / "summary.json").read_text())
    assert (
        summary["train_size"] == 8
        and 0 <= summary["knn10_acc"] <= 1
        and 0 <= summary["knn1_acc"] <= 1
    )


def test_every_float_flag_refuses_nan_and_infinity():
    """Each float flag parses with config.finite_float, and each is among the flags tested above."""
    actions = [a for a in config.build_parser()._actions if a.type in (float, config.finite_float)]
    assert actions and all(a.type is config.finite_float for a in actions)
    assert {a.option_strings[0] for a in actions} == {flag for flag, _ in NOT_FINITE}


def test_summary_json_is_strict_json(tmp_path):
    """NaN and infinities (a metric of a collapsed run) become null: no NaN token that strict parsers refuse."""
    write_json(
        tmp_path / "summary.json",
        {
            "acc": 0.5,
            "nmi": math.nan,
            "terms": [math.inf, -math.inf, 1.5],
            "nested": {"ami": math.nan},
        },
    )
    text = (tmp_path / "summary.json").read_text()

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    assert json.loads(text, parse_constant=refuse) == {
        "acc": 0.5,
        "nmi": None,
        "terms": [None, None, 1.5],
        "nested": {"ami": None},
    }


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as info:
        main.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    flags = (
        "--loss --dataset --data-dir --model --feat-dim --epochs --batch-size --lr --lr-cent --momentum --weight-cent "
        "--weight-intra --weight-inter --factor --patience --threshold --seed --device --out --name --no-plots --plot-every"
    ).split()
    tokens = set(text.replace("[", " ").replace("]", " ").replace(",", " ").split())
    missing = [flag for flag in flags if flag not in tokens]
    assert not missing, missing
    assert "--inter-margin" in tokens and "--train-samples" in tokens and "--overwrite" in tokens
    assert "0 to 4294967295" in " ".join(text.split())  # the seed range
    assert {"--weight-decay", "--clip-grad-norm", "--center-update", "--center-alpha"} <= tokens


def test_defaults_follow_the_study():
    args = config.parse_args([])
    assert (args.loss, args.model, args.feat_dim) == ("standalone", "resnet", 2)
    assert (args.epochs, args.batch_size, args.patience, args.threads) == (20, 64, 3, 1)  # digits
    assert config.parse_args(["--dataset", "mnist"]).threads is None  # torch's: one per core
    study = config.parse_args(["--dataset", "mnist"])
    assert (study.epochs, study.batch_size, study.patience, study.factor, study.threshold) == (
        100,
        128,
        10,
        0.2,
        0.1,
    )
    # explicit flags win
    assert (
        config.parse_args(["--epochs", "7", "--batch-size", "16", "--patience", "1"]).batch_size
        == 16
    )
    assert (args.lr, args.lr_cent, args.momentum) == (0.01, 0.01, 0.9)
    assert (args.weight_cent, args.weight_intra, args.weight_inter) == (1.0, 1.0, 0.1)
    assert args.name == "standalone-digits-feat=2"
    assert (
        config.parse_args(["--dataset", "cifar-10", "--lr", "0.1"]).name
        == "standalone-cifar10-feat=2"
    )
    assert config.parse_args(["--lr", "0.1"]).lr_cent == 0.1
    assert (args.weight_decay, args.clip_grad_norm, args.center_update, args.center_alpha) == (
        0.0,
        0.0,
        "sgd",
        None,
    )


def test_loss_flags_default_only_where_they_are_used():
    """The loss-specific flags default (None sentinels filled after the checks) without being refused."""
    xent = config.parse_args(["--loss", "xent"])
    assert (xent.weight_cent, xent.alpha, xent.lr_cent, xent.workers) == (
        1.0,
        0.05,
        0.01,
        batches.default_workers(),
    )
    # plain xent by another name: allowed
    assert config.parse_args(["--loss", "cent", "--weight-cent", "0"]).weight_cent == 0.0
    # the inter term alone still trains
    assert config.parse_args(["--weight-intra", "0"]).weight_inter == 0.1
    assert config.parse_args(["--loss", "centers-apart", "--alpha", "0.2"]).alpha == 0.2
    assert config.parse_args(["--pipeline", "loader", "--workers", "0"]).workers == 0


TORCHRUN = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize(
    "env,message",
    [
        (
            {"WORLD_SIZE": "abc"},
            "the environment's WORLD_SIZE='abc' is not a positive number of processes",
        ),
        (
            {"WORLD_SIZE": "0"},
            "the environment's WORLD_SIZE='0' is not a positive number of processes",
        ),
        (
            {"WORLD_SIZE": "2"},
            "the environment has WORLD_SIZE=2 but not RANK, MASTER_ADDR, MASTER_PORT: start with torchrun",
        ),
        (
            {"RANK": "abc"},
            "the environment's RANK='abc' is not a process rank from 0 to 0 (WORLD_SIZE 1)",
        ),
        (
            {**TORCHRUN, "RANK": "2"},
            "the environment's RANK='2' is not a process rank from 0 to 1 (WORLD_SIZE 2)",
        ),
        (
            {**TORCHRUN, "RANK": "-1"},
            "the environment's RANK='-1' is not a process rank from 0 to 1",
        ),
        (
            {**TORCHRUN, "LOCAL_RANK": "x"},
            "the environment's LOCAL_RANK='x' is not a process rank from 0 to 1",
        ),
        (
            {**TORCHRUN, "MASTER_PORT": "65536"},
            "the environment's MASTER_PORT='65536' is not a port number from 1 to 65535",
        ),
        (
            {**TORCHRUN, "MASTER_PORT": "http"},
            "the environment's MASTER_PORT='http' is not a port number from 1 to 65535",
        ),
    ],
)
def test_rank_variables_out_of_range_are_one_line(env, message, monkeypatch, capsys):
    """torchrun's variables set by hand: each checked before anything waits or is written (exit 2, one line)."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        main.main(["--epochs", "1"])
    assert info.value.code == 2
    assert message in stderr_error_line(capsys.readouterr().err)


def test_processes_that_never_join_end_in_one_line(tmp_path, monkeypatch, capsys):
    """WORLD_SIZE=2 and RANK=0 set by hand, no second process: rank 0 says it waits, waits JOIN_TIMEOUT for it (not
    torch's 30 minutes), then one line, exit 1, nothing written."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {**TORCHRUN, "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed, "JOIN_TIMEOUT", timedelta(seconds=1))
    started = time.monotonic()
    assert main.main(["--epochs", "1", "--out", str(tmp_path)]) == 1
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    # not silently
    assert err.startswith(f"rank 0: waiting up to 1 s for all 2 processes at 127.0.0.1:{port}\n")
    line = stderr_error_line(err)
    assert line.startswith(
        f"error: rank 0: not all 2 processes met at 127.0.0.1:{port} within 1 s ("
    )
    assert line.endswith("start them with torchrun --nproc-per-node 2 main.py ...")
    assert not list(tmp_path.iterdir())


def test_lenet_recipe_and_paper_center_update_defaults():
    lenet = config.parse_args(["--model", "lenet++"])
    assert (lenet.weight_decay, lenet.clip_grad_norm) == (5e-4, 10.0)
    lenet = config.parse_args(
        ["--model", "lenet++", "--weight-decay", "0", "--clip-grad-norm", "0"]
    )
    # explicit values win over the recipe
    assert (lenet.weight_decay, lenet.clip_grad_norm) == (0.0, 0.0)
    assert config.parse_args(["--clip-grad-norm", "5"]).clip_grad_norm == 5.0
    paper = config.parse_args(["--center-update", "paper"])
    assert (paper.center_alpha, paper.lr_cent) == (0.5, None)  # the paper's alpha; no SGD centers
    assert (
        config.parse_args(
            ["--loss", "cent", "--center-update", "paper", "--center-alpha", "0.1"]
        ).center_alpha
        == 0.1
    )


# ------------------------------------------------------------------------------------- real data


def test_real_mnist_beats_chance(real_run):
    """50 steps of the default standalone resnet (feat_dim 128) on the real MNIST: well above chance."""
    proc, run_dir = real_run
    check_ok(proc)
    summary = json.loads((run_dir / "summary.json").read_text())
    print(
        f"real MNIST, {REAL_TRAIN_SAMPLES // 64} steps: acc {summary['acc']:.4f}, ncm acc {summary['ncm_acc']:.4f}"
    )
    assert summary["train_size"] == REAL_TRAIN_SAMPLES and summary["test_size"] == 10000
    assert (
        summary["feat_dim"] == 128
        and summary["loss"] == "standalone"
        and summary["model"] == "resnet"
    )
    assert summary["acc"] > 0.5, proc.stdout
    assert not (run_dir / "frames").exists() and not (run_dir / "train.png").exists()  # --no-plots


# ------------------------------------------------------------------------- hardening, issue 39

TINY = ["--epochs", "1", "--train-samples", "64", "--batch-size", "32", "--model", "lenet++"]
TINY += ["--no-plots", "--device", "cpu"]


@pytest.mark.parametrize("extra", [[], ["--lr-cent", "0.5"]], ids=["lr", "centers-move"])
def test_a_learning_rate_that_moves_no_weight_is_refused_after_the_epoch(tmp_path, capsys, extra):
    """--lr 1e-30 passes the range check, but every update is below the float32 spacing of every weight: the run
    ended "done" having learned nothing. Moving centers (--lr-cent) do not make the model learn."""
    assert main.main([*TINY, "--lr", "1e-30", *extra, "--out", str(tmp_path)]) == 1
    line = stderr_error_line(capsys.readouterr().err)
    assert line.startswith("error: no weight changed during epoch 1 (by 0, weights of norm ")
    assert line.endswith(
        "): --lr 1e-30 is too small to move float32 weights; no checkpoint was saved (none of an "
        "earlier epoch); give a larger --lr (or larger loss weights)"
    )
    assert listing(tmp_path).keys() == {
        "standalone-digits-feat=2",
        "standalone-digits-feat=2/args.json",
    }


@pytest.mark.parametrize(
    ("hook", "signum"), [("epoch_row", signal.SIGINT), ("end_epoch", signal.SIGTERM)]
)
def test_a_signal_between_epochs_says_so_in_one_line(tmp_path, monkeypatch, capsys, hook, signum):
    """During the evaluation or the writing after an epoch, a signal used to end the run silently."""
    original = getattr(main, hook)
    monkeypatch.setattr(
        main, hook, lambda *args: (os.kill(os.getpid(), signum), original(*args))[1]
    )
    assert main.main([*TINY, "--out", str(tmp_path)]) == 128 + signum
    assert capsys.readouterr().err == (
        "interrupted after epoch 1's training (during its evaluation or writing); "
        "its checkpoint is saved, run the same command to resume\n"
    )
    run_dir = tmp_path / "standalone-digits-feat=2"
    assert (run_dir / "checkpoint.pt").is_file() and not (run_dir / "summary.json").exists()
    monkeypatch.undo()
    assert main.main([*TINY, "--out", str(tmp_path)]) == 0 and (run_dir / "summary.json").is_file()


def test_a_signal_ends_the_wait_for_torchrun_processes_at_once(tmp_path, monkeypatch, capsys):
    """Processes started by hand wait for the others: SIGTERM there took effect only when the wait ended."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {**TORCHRUN, "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed, "JOIN_TIMEOUT", timedelta(seconds=40))
    wait = distributed.dist.rendezvous
    kill = threading.Timer(1, os.kill, (os.getpid(), signal.SIGTERM))
    monkeypatch.setattr(
        distributed.dist, "rendezvous", lambda *a, **k: (kill.start(), wait(*a, **k))[1]
    )
    monkeypatch.setattr(signal, "SIGTERM", signal.SIGTERM)  # restored below, with its handler
    previous = signal.signal(signal.SIGTERM, main.interrupt)  # main.py's, but for its os._exit
    started = time.monotonic()
    try:
        assert main.main(["--out", str(tmp_path)]) == 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert time.monotonic() - started < 20
    assert capsys.readouterr().err.endswith(f"\n{main.STARTUP_INTERRUPT}\n")
    # A second process joins, so the waiting thread ends: one left in C++ at exit would abort the suite.
    joiner = distributed.dist.TCPStore("127.0.0.1", port, 2, False, timeout=timedelta(seconds=20))
    for waiter in (t for t in threading.enumerate() if "rendezvous" in t.name):
        waiter.join(20)
        assert not waiter.is_alive()
    del joiner


def tiny_subprocess(tmp_path: Path, **kwargs) -> subprocess.CompletedProcess:
    command = [sys.executable, str(main.__file__), *TINY, "--out", str(tmp_path)]
    env = {**subprocess_env(), **kwargs.pop("env", {})}
    return subprocess.run(
        command, stderr=subprocess.PIPE, text=True, env=env, timeout=300, **kwargs
    )


@pytest.mark.parametrize("stdout", ["reader-left", "closed"])
def test_stdout_that_cannot_be_written_does_not_stop_the_run(tmp_path, stdout):
    """`main.py | head -1`: the next line met a BrokenPipeError, a traceback, and the run died before its summary;
    `main.py >&-`: sys.stdout is None, an AttributeError."""
    read, write = os.pipe()
    os.close(read)
    closed = {"stdout": write} if stdout == "reader-left" else {"preexec_fn": lambda: os.close(1)}
    proc = tiny_subprocess(tmp_path, **closed)
    os.close(write)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert (tmp_path / "standalone-digits-feat=2" / "summary.json").is_file()


def test_matplotlib_that_cannot_start_is_one_line(tmp_path):
    """As an unprivileged user under umask 777, matplotlib finds no writable cache folder and its import raises;
    simulated (the suite runs as root) by a matplotlib that raises what it raises then."""
    fake = tmp_path / "fake" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        'raise OSError("Matplotlib requires access to a writable cache directory")'
    )
    proc = tiny_subprocess(tmp_path, stdout=subprocess.PIPE, env={"PYTHONPATH": str(fake.parent)})
    assert proc.returncode == 1 and proc.stderr == (
        "error: matplotlib cannot be imported (Matplotlib requires access to a writable cache directory); "
        "check its install and that MPLCONFIGDIR or the home folder is writable\n"
    )
    assert not (tmp_path / "standalone-digits-feat=2").exists()
