"""main.py end to end: tiny runs in subprocesses, their files, accuracy, refusals and bad input."""

from __future__ import annotations

import ast
import csv
import json
import math
import os
import shlex
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

# Each loss's terms and their weights (the defaults): the reported loss is their weighted sum.
LOSS_TERMS = {
    "xent": {"xent": 1},
    "cent": {"xent": 1, "intra": 1},
    "standalone": {"intra": 1, "inter": 0.1},
}
QUICK = "--epochs 1 --train-samples 64 --batch-size 32 --model lenet++ --no-plots --device cpu"
QUICK = QUICK.split()


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def read_metrics(run_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.mark.parametrize("loss", LOSS_TERMS)
def test_tiny_run_files(tiny_runs, background, loss):
    run_dir = tiny_runs[loss]
    assert run_dir.name == f"{loss}-mnist-feat=2"
    args = read_json(run_dir / "args.json")
    mnist = background.paths["mnist"]
    wanted = dict(loss=loss, dataset="mnist", feat_dim=2, epochs=2, model="resnet")
    assert {k: args[k] for k in wanted} == wanted and args["data_dir"] == str(mnist)

    header, rows = read_metrics(run_dir)
    assert header == main.COLUMNS and [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        for split in ("train", "test"):
            terms = {t: row[f"{split}_{t}"] for t in ("xent", "intra", "inter")}
            assert {t for t, value in terms.items() if value != ""} == set(LOSS_TERMS[loss])
            total = sum(w * float(terms[t]) for t, w in LOSS_TERMS[loss].items())
            assert float(row[f"{split}_loss"]) == pytest.approx(total, rel=1e-4, abs=1e-5)
        assert all(math.isfinite(float(row[c])) for c in main.COLUMNS if row[c] != "")
        assert all(0 <= float(row[acc]) <= 1 for acc in ("train_acc", "test_acc", "ncm_acc"))
        assert (row["center_acc"] == "") == (loss == "xent")
        assert float(row["test_inter"] or 0) <= 0  # -log(1 + d) summed: never positive
        assert float(row["lr"]) == 0.01 and row["bad_steps"] == "0" and float(row["seconds"]) > 0

    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and "model" in ckpt
    centers = ckpt["objective"].get("criterion.centers")
    assert (centers is None) if loss == "xent" else centers.shape == (10, 2)

    summary = read_json(run_dir / "summary.json")
    accs = [float(r["test_acc"]) for r in rows]
    numbers = dict(acc=accs[-1], best_acc=max(accs), ncm_acc=float(rows[-1]["ncm_acc"]))
    assert {k: summary[k] for k in numbers} == pytest.approx(numbers, rel=1e-5)
    sizes = dict(epochs=2, train_size=MNIST_TRAIN, test_size=MNIST_TEST, num_classes=10)
    assert {k: summary[k] for k in sizes} == sizes and summary["samples_per_second"] > 0
    assert (summary["loss"], summary["name"]) == (loss, run_dir.name)
    raw = mnist / "MNIST" / "raw"
    assert summary["data_source"] == f"IDX files in {os.path.relpath(raw, run_dir)}"
    assert [(run_dir / f).resolve().parent for f in summary["data_files"]] == [raw.resolve()] * 4


@pytest.mark.parametrize("loss", LOSS_TERMS)
def test_accuracy_is_the_nearest_center_or_the_argmax(tiny_runs, loss):
    """The study's evaluation, recomputed from the checkpoint's model: each test sample goes to the
    nearest learned center (standalone) or to the argmax of the logits (xent, cent)."""
    run_dir = tiny_runs[loss]
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    args, summary = read_json(run_dir / "args.json"), read_json(run_dir / "summary.json")
    data = load_dataset(args["dataset"], args["data_dir"], download=False)
    model = build_model(args["model"], data.channels, 10, args["feat_dim"], data.image_size)
    model.load_state_dict(ckpt["model"])
    layout = torch.channels_last if args["channels_last"] else torch.contiguous_format
    with torch.no_grad():
        x = (data.test.images.float() / 255).contiguous(memory_format=layout)
        features, logits = model.eval().to(memory_format=layout)(x)
    if loss == "standalone":
        centers = ckpt["objective"]["criterion.centers"]
        predictions = ((features[:, None, :] - centers) ** 2).sum(-1).argmin(1)  # no expansion
        # Features collapsed onto one center would give chance accuracy whichever way computed.
        assert len(set(predictions.tolist())) > 1, "all test samples share one nearest center"
    else:
        predictions = logits.argmax(1)
    acc = (predictions == data.test.labels).float().mean().item()
    assert summary["acc"] == pytest.approx(acc, abs=1e-6)
    assert loss != "standalone" or summary["center_acc"] == pytest.approx(acc, abs=1e-6)


def test_name_and_out_are_honoured(named_run):
    _, run_dir = named_run
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["my run"]
    summary = read_json(run_dir / "summary.json")
    wanted = dict(name="my run", model="lenet++", train_size=32, epochs=1)
    assert {k: summary[k] for k in wanted} == wanted
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

    (run_dir / "stale.txt").write_text("from the old run")  # --overwrite replaces the folder
    assert main.main([*argv, "--overwrite", "--device", "cpu"]) == 0
    summary = read_json(run_dir / "summary.json")
    assert summary["epochs"] == 1 and summary["overwrite"] is True
    assert len(read_metrics(run_dir)[1]) == 1
    files = ".lock .lock.pid args.json checkpoint.pt metrics.csv summary.json".split()
    assert sorted(p.name for p in run_dir.iterdir()) == files


@pytest.mark.parametrize("loss", LOSS_TERMS)
def test_lenet_smoke_run_with_its_recipe(lenet_runs, background, loss):
    run_dir = lenet_runs[loss]
    summary = read_json(run_dir / "summary.json")
    keys = ("model", "loss", "weight_decay", "clip_grad_norm", "bad_steps")
    assert [summary[k] for k in keys] == ["lenet++", loss, 5e-4, 10.0, 0]
    assert math.isfinite(summary["acc"])
    _, rows = read_metrics(run_dir)
    assert len(rows) == 1 and math.isfinite(float(rows[0]["train_loss"]))
    model = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    train = load_dataset("mnist", background.paths["mnist"], download=False).train
    mean, std = channel_stats(train.images[:64])
    assert model["mean"].flatten().tolist() == pytest.approx(mean)
    assert model["std"].flatten().tolist() == pytest.approx(std)


# Every float flag, each with NaN or an infinity (comparisons with NaN are false: range checks
# alone let it pass).
NOT_FINITE = "--lr=inf --lr=-inf --lr-cent=nan --momentum=nan --weight-cent=inf --weight-intra=nan"
NOT_FINITE += " --weight-inter=nan --inter-margin=inf --alpha=nan --factor=nan --threshold=inf"
NOT_FINITE += " --val-fraction=nan --weight-decay=nan --clip-grad-norm=inf --center-alpha=nan"
# Zero, subnormal or infinite in float32, in which training computes: it would learn nothing and
# still end "done".
NOT_FLOAT32 = "--lr=1e-300,--loss xent --lr=1e-45,--loss cent --lr=1e-39,--lr=1e39"
NOT_FLOAT32 += ",--weight-inter=1e-300,--loss cent --weight-cent=-1e-40,--lr-cent=1e-300"
NOT_FLOAT32 += ",--center-update paper --center-alpha=1e-300,--inter-margin=1e-300"
# argv | a part of the one error line (exit 2). In argv, {tmp} is the test's folder, which holds
# a-file, read-only/, loop (a link to itself) and out/ (the default --out) with a finished run
# decoy/, someone's notes/, a file a-file and a link to decoy; a VAR=value word is set in the
# environment ({torchrun}: the variables torchrun sets, for 2 processes); {name} is a data set
# made by DATA below.
REFUSALS = """
--loss softmax | argument --loss: invalid choice: 'softmax'
--dataset imagenet | argument --dataset: invalid choice: 'imagenet'
--feat-dim 0 | --feat-dim must be at least 1
--batch-size 1 | --batch-size must be at least 2
--lr -1 | --lr must be positive
--lr fast | argument --lr: not a number: 'fast'
--epochs 0 | --epochs must be at least 1
--threads 0 | --threads must be at least 1
--momentum 1.5 | --momentum must be in [0, 1)
--weight-inter -0.1 | loss weights must be 0 to 1e+06
--loss cent --weight-cent 1e30 | loss weights must be 0 to 1e+06
--plot-every 0 | --plot-every must be at least 1
--data-dir /nonexistent/scl-data | --data-dir /nonexistent/scl-data does not exist
--dataset folder | --dataset folder needs --data-dir
--seed -1 | --seed must be an integer from 0 to 4294967295
--seed 4294967296 | --seed must be an integer from 0 to 4294967295
--no-plots --projection tsne | --projection is for --feat-dim 3 or more with plots; drop it
--projection tsne | --projection is for --feat-dim 3 or more with plots; drop it
--feat-dim 8 --no-plots --projection pca | --projection is for --feat-dim 3 or more with plots
--no-plots --plot-every 3 | --plot-every is for --feat-dim 2 with plots; drop it
--feat-dim 8 --plot-every 3 | --plot-every is for --feat-dim 2 with plots; drop it
--device meta | --device meta: not a device to train on
--device mps | --device mps: MPS is not supported (its mixed-precision step is unsafe
--device cuda | --device cuda: CUDA is not available here
--name '' | --name '' must be one plain folder name
--name .. | --name '..' must be one plain folder name
--resume --overwrite | --resume continues a run and --overwrite deletes it
--out {tmp}/a-file | is a file, not a folder
--out {tmp}/a-file/runs | is a file, not a folder
--out /proc/self/runs | lies under /proc, a kernel file system
--out /sys/runs | lies under /sys, a kernel file system
--out {tmp}/read-only/runs | is not writable
--weight-decay -1 | --weight-decay must not be negative
--clip-grad-norm -1 | --clip-grad-norm must not be negative
--loss xent --center-update paper | --center-update paper needs --loss cent or standalone
--loss centers-apart --center-update paper | (centers-apart moves its centers by terms of its own)
--center-alpha 0.5 | --center-alpha is for --center-update paper; drop it
--center-update paper --center-alpha 1.5 | --center-alpha must be in (0, 1]
--center-update paper --lr-cent 0.1 | --lr-cent is for SGD centers; use --center-alpha
--loss standalone --weight-cent 1 | --weight-cent is used by --loss cent, not by --loss standalone
--loss xent --lr-cent 0.1 | --lr-cent is used by every loss but xent (the losses with centers), not
--loss xent --inter-margin 2 | --inter-margin is used by --loss standalone, not by --loss xent
--loss centers-apart --inter-margin 2 | --inter-margin is used by --loss standalone, not by --loss c
--loss xent --alpha 0.1 | --alpha is used by --loss centers-apart, not by --loss xent
--loss standalone --alpha 0.1 | --alpha is used by --loss centers-apart, not by --loss standalone
--loss xent --weight-inter 0.1 | --weight-inter is used by --loss standalone and centers-apart, not
--loss cent --weight-intra 1 | --weight-intra is used by --loss standalone and centers-apart, not
--workers 2 | --workers sets the DataLoader processes of --pipeline loader; drop it
--weight-intra 0 --weight-inter 0 | --weight-intra 0 and --weight-inter 0 make the standalone loss
--loss centers-apart --weight-intra 0 --weight-inter 0 | make the centers-apart loss zero
--name {n256} | --name is 256 bytes, over a file name's 255
--out {tmp}/{o256}/runs | is 256 bytes long, more than the 255 a file system allows
--out '' | --out must not be empty
--out {tmp}/loop/runs | --out {tmp}/loop/runs: a loop of symbolic links
--out '{tmp}/runs ' | --out '{tmp}/runs ' starts or ends with whitespace
--name ' run' | --name ' run' starts or ends with whitespace
--out {tmp}/{deep} | --out and --name make a path over 3996 bytes
--name '' --overwrite | --name '' must be one plain folder name
--name .. --overwrite | --name '..' must be one plain folder name
--name . --overwrite | --name '.' must be one plain folder name
--name decoy/.. --overwrite | --name 'decoy/..' must be one plain folder name
--name decoy --overwrite --resume | --resume continues a run and --overwrite deletes it
--name decoy | holds a finished run; use --overwrite
--name notes --overwrite | is not a run folder of main.py
--name notes | is not a run folder of main.py
--name a-file --overwrite | exists and is not a folder
--name link --overwrite | exists and is not a folder
--out {tmp}/out/decoy --name checkpoint.pt --overwrite | exists and is not a folder
WORLD_SIZE=abc | the environment's WORLD_SIZE='abc' is not a positive number of processes
WORLD_SIZE=0 | the environment's WORLD_SIZE='0' is not a positive number of processes
WORLD_SIZE=2 | has WORLD_SIZE=2 but not RANK, MASTER_ADDR, MASTER_PORT: start with torchrun
RANK=abc | the environment's RANK='abc' is not a process rank from 0 to 0 (WORLD_SIZE 1)
{torchrun} RANK=2 | the environment's RANK='2' is not a process rank from 0 to 1 (WORLD_SIZE 2)
{torchrun} RANK=-1 | the environment's RANK='-1' is not a process rank from 0 to 1
{torchrun} LOCAL_RANK=x | the environment's LOCAL_RANK='x' is not a process rank from 0 to 1
{torchrun} MASTER_PORT=65536 | MASTER_PORT='65536' is not a port number from 1 to 65535
{torchrun} MASTER_PORT=http | MASTER_PORT='http' is not a port number from 1 to 65535
--dataset folder --data-dir {tree-6} --model lenet++ --batch-size 4 | lenet++ needs images of at least 8x8 pixels and {tree-6} has 6x6
--dataset folder --data-dir {tree-2} --model resnet --batch-size 4 | resnet needs images of at least 3x3 pixels and {tree-2} has 2x2
--train-samples 4 --val-fraction 0.9 | the train set has 0 samples, fewer than one batch
--train-samples 20 --batch-size 32 | the train set has 20 samples, fewer than one batch of --batch-size 32
"""
# The same for bad data, which exits 1.
FAILURES = """
--dataset mnist --data-dir {empty-idx} | train-images-idx3-ubyte: an IDX file of no items
--dataset mnist --data-dir {one-class} --train-samples 4 --batch-size 2 | has only the class '7' in its first --train-samples 4; a classifier needs at least two
--dataset folder --data-dir {bad-png} | {bad-png}/train/bee/x.png
"""
for word in NOT_FINITE.split():
    flag, value = word.split("=")
    REFUSALS += f"{word} | argument {flag}: must be a finite number, not '{value}'\n"
for words in NOT_FLOAT32.split(","):
    flag, value = words.split()[-1].split("=")
    REFUSALS += f"{words} | argument {flag}: '{value}' is outside float32's normal range, "
    REFUSALS += "1.18e-38 to 3.4e+38 in size\n"
TORCHRUN = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
LONG = {"{n256}": "n" * 256, "{o256}": "o" * 256, "{deep}": "/".join(["d" * 200] * 20)}


def write_empty_idx(root: Path) -> None:
    """A tiny MNIST whose train files have a valid header and no items."""
    write_tiny_mnist(root)
    write_idx(root / "MNIST/raw/train-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8))
    write_idx(root / "MNIST/raw/train-labels-idx1-ubyte", np.zeros(0, np.uint8))


def write_one_class(root: Path) -> None:
    """A tiny MNIST whose first 4 train images are all of class 7: nothing to tell apart."""
    labels = write_tiny_mnist(root)["train_labels"]
    labels[:4] = 7
    write_idx(root / "MNIST/raw/train-labels-idx1-ubyte", labels)


def write_bad_png(root: Path) -> None:
    write_image_tree(root, "RGB", 32, per_class=(2, 1))
    (root / "train/bee/x.png").write_bytes(b"\x89PNG but not really" * 4)


DATA = {
    "{empty-idx}": write_empty_idx,
    "{one-class}": write_one_class,
    "{bad-png}": write_bad_png,
    "{tree-6}": lambda root: write_image_tree(root, "L", 6),
    "{tree-2}": lambda root: write_image_tree(root, "L", 2),
}
SKIPS = {  # rows whose refusal cannot happen here
    "--device cuda": pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available"),
    "read-only": pytest.mark.skipif(os.name == "nt" or os.geteuid() == 0, reason="root or Windows"),
}


def table(text: str, code: int) -> list:
    """The rows of a table "argv | message", as pytest params (argv, code, message)."""
    rows = [line.split(" | ", 1) for line in text.strip().splitlines()]
    return [
        pytest.param(a, code, m, marks=[s for key, s in SKIPS.items() if key in a], id=a)
        for a, m in rows
    ]


@pytest.mark.parametrize("argv,code,message", table(REFUSALS, 2) + table(FAILURES, 1))
def test_every_refusal_is_one_line_and_writes_nothing(
    argv, code, message, tmp_path, monkeypatch, capsys
):
    """Every bad argument, environment variable or data set: exit 2 (arguments) or 1 (data), one
    line naming it, and the whole tree, the parent of --out included, stays as it was: --name and
    --overwrite can only ever replace one run folder that main.py made."""
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "read-only").mkdir(mode=0o500)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    out = tmp_path / "out"
    write_finished_decoy(out / "decoy")
    (out / "notes").mkdir()
    (out / "notes" / "todo.txt").write_text("precious")
    (out / "a-file").write_text("a file")
    (out / "link").symlink_to(out / "decoy")
    subs = {"{tmp}": str(tmp_path), **LONG}
    for key, write in DATA.items():
        if key in argv:
            subs[key] = str(tmp_path / key[1:-1])
            write(tmp_path / key[1:-1])
    for name in (*TORCHRUN, "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    words = shlex.split(
        argv.replace("{torchrun}", " ".join(f"{k}={v}" for k, v in TORCHRUN.items()))
    )
    for key, value in subs.items():
        words, message = [w.replace(key, value) for w in words], message.replace(key, value)
    for word in words:
        if word[:1].isupper():
            monkeypatch.setenv(*word.split("=", 1))
    before = listing(tmp_path)
    try:
        result = main.main(["--out", str(out), *(w for w in words if not w[:1].isupper())])
    except SystemExit as stop:
        result = stop.code
    assert result == code
    assert message in stderr_error_line(capsys.readouterr().err)
    assert listing(tmp_path) == before


def test_bad_data_in_a_subprocess_is_one_line(bad_data_dir_run, truncated_run):
    """--data-dir /nonexistent: exit 2, nothing on stdout; a truncated IDX file: exit 1, the file
    named, no summary.json."""
    assert bad_data_dir_run.returncode == 2 and bad_data_dir_run.stdout == ""
    assert stderr_error_line(bad_data_dir_run.stderr) == (
        "main.py: error: --data-dir /nonexistent does not exist or is not a folder"
    )
    proc, bad, out = truncated_run
    assert proc.returncode == 1, proc.stderr
    line = stderr_error_line(proc.stderr)
    assert str(bad) in line and "truncated" in line
    assert not list(out.glob("**/summary.json"))


def test_a_model_too_large_for_memory_is_one_line(tmp_path, capsys):
    """2**40 features make a 512 TiB layer, beyond any address space: one line, exit 1, no
    summary."""
    assert main.main(["--feat-dim", str(2**40), "--epochs", "1", "--out", str(tmp_path)]) == 1
    line = stderr_error_line(capsys.readouterr().err)
    assert line.startswith("error: out of memory (")
    assert line.endswith("); use a smaller --batch-size or --feat-dim")
    assert not list(tmp_path.glob("**/summary.json"))


def test_overwrite_keeps_an_empty_folder_it_did_not_make(tmp_path):
    """--overwrite deletes only main.py's run folders: an empty folder of someone else's (here with
    the sticky bit of a shared /tmp) is reused as it is, not deleted and recreated."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    argv = [*QUICK, "--train-samples", "32", "--out", str(tmp_path), "--name", "shared"]
    assert main.main([*argv, "--overwrite"]) == 0
    assert (shared.stat().st_mode & 0o7777) == 0o1777
    assert (shared / "summary.json").is_file()


def test_train_set_smaller_than_knn_k(tmp_path):
    """--train-samples 8 leaves a k-NN gallery of 8 train features: knn10_acc uses k = 8 instead of
    failing."""
    argv = [*QUICK, "--train-samples", "8", "--batch-size", "8", "--out", str(tmp_path)]
    assert main.main(argv) == 0
    summary = read_json(tmp_path / "standalone-digits-feat=2" / "summary.json")
    assert summary["train_size"] == 8 and 0 <= summary["knn10_acc"] <= 1
    assert 0 <= summary["knn1_acc"] <= 1


def test_every_float_flag_refuses_nan_and_infinity():
    """Each flag that parses 1.5 as a float refuses nan and inf, and each is among the rows above."""
    parser = config.build_parser()

    def parsed(flag: str, value: str):
        try:
            return getattr(parser.parse_args([flag, value]), flag[2:].replace("-", "_"))
        except SystemExit:
            return None

    flags = {"--" + key.replace("_", "-") for key in vars(parser.parse_args([]))}
    floats = {flag for flag in flags if isinstance(parsed(flag, "1.5"), float)}
    assert all(parsed(flag, value) is None for flag in floats for value in ("nan", "inf"))
    assert floats == {w.split("=")[0] for w in NOT_FINITE.split()}


def test_summary_json_is_strict_json(tmp_path):
    """NaN and infinities (a metric of a collapsed run) become null: no NaN token that strict
    parsers refuse."""
    values = {
        "acc": 0.5,
        "nmi": math.nan,
        "terms": [math.inf, -math.inf, 1.5],
        "n": {"ami": math.nan},
    }
    write_json(tmp_path / "summary.json", values)

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    text = (tmp_path / "summary.json").read_text()
    nulls = {"acc": 0.5, "nmi": None, "terms": [None, None, 1.5], "n": {"ami": None}}
    assert json.loads(text, parse_constant=refuse) == nulls


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as info:
        main.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    flags = """--loss --dataset --data-dir --model --feat-dim --epochs --batch-size --lr --lr-cent
    --momentum --weight-cent --weight-intra --weight-inter --factor --patience --threshold --seed
    --device --out --name --no-plots --plot-every --inter-margin --train-samples --overwrite
    --weight-decay --clip-grad-norm --center-update --center-alpha""".split()
    tokens = set(text.replace("[", " ").replace("]", " ").replace(",", " ").split())
    assert [flag for flag in flags if flag not in tokens] == []
    assert "0 to 4294967295" in " ".join(text.split())  # the seed range


# argv | the parsed arguments: the study's defaults (MNIST's for --dataset mnist), explicit flags
# winning, the loss flags' defaults where they are not used (None sentinels filled after the
# checks), lenet++'s recipe and the paper's center update.
DEFAULTS = f"""
 | loss=standalone model=resnet feat_dim=2 epochs=20 batch_size=64 patience=3 threads=1
 | lr=0.01 lr_cent=0.01 momentum=0.9 weight_cent=1.0 weight_intra=1.0 weight_inter=0.1
 | name=standalone-digits-feat=2 weight_decay=0.0 clip_grad_norm=0.0 center_update=sgd
 | center_alpha=None
--dataset mnist | threads=None epochs=100 batch_size=128 patience=10 factor=0.2 threshold=0.1
--epochs 7 --batch-size 16 --patience 1 | epochs=7 batch_size=16 patience=1
--dataset cifar-10 --lr 0.1 | name=standalone-cifar10-feat=2
--lr 0.1 | lr_cent=0.1
--loss xent | weight_cent=1.0 alpha=0.05 lr_cent=0.01 workers={batches.default_workers()}
--loss cent --weight-cent 0 | weight_cent=0.0
--weight-intra 0 | weight_inter=0.1
--loss centers-apart --alpha 0.2 | alpha=0.2
--pipeline loader --workers 0 | workers=0
--model lenet++ | weight_decay=0.0005 clip_grad_norm=10.0
--model lenet++ --weight-decay 0 --clip-grad-norm 0 | weight_decay=0.0 clip_grad_norm=0.0
--clip-grad-norm 5 | clip_grad_norm=5.0
--center-update paper | center_alpha=0.5 lr_cent=None
--loss cent --center-update paper --center-alpha 0.1 | center_alpha=0.1
"""


def literal(text: str) -> object:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


@pytest.mark.parametrize("argv,values", [r.split("|") for r in DEFAULTS.strip().splitlines()])
def test_defaults(argv, values):
    args = vars(config.parse_args(argv.split()))
    expected = dict(word.split("=", 1) for word in values.split())
    assert {k: args[k] for k in expected} == {k: literal(v) for k, v in expected.items()}


def free_port_for_rank_0(monkeypatch, join_timeout: float) -> int:
    """WORLD_SIZE=2 and RANK=0 set by hand on a free port, JOIN_TIMEOUT `join_timeout` s."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {**TORCHRUN, "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed, "JOIN_TIMEOUT", timedelta(seconds=join_timeout))
    return port


def test_processes_that_never_join_end_in_one_line(tmp_path, monkeypatch, capsys):
    """No second process: rank 0 says it waits, waits JOIN_TIMEOUT for it (not torch's 30
    minutes), then one line, exit 1, nothing written."""
    port = free_port_for_rank_0(monkeypatch, 1)
    started = time.monotonic()
    assert main.main(["--epochs", "1", "--out", str(tmp_path)]) == 1
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert err.startswith(f"rank 0: waiting up to 1 s for all 2 processes at 127.0.0.1:{port}\n")
    line = stderr_error_line(err)
    assert line.startswith(
        f"error: rank 0: not all 2 processes met at 127.0.0.1:{port} within 1 s ("
    )
    assert line.endswith("start them with torchrun --nproc-per-node 2 main.py ...")
    assert not list(tmp_path.iterdir())


def test_a_signal_ends_the_wait_for_torchrun_processes_at_once(tmp_path, monkeypatch, capsys):
    """Processes started by hand wait for the others: SIGTERM there took effect only when the wait
    ended."""
    port = free_port_for_rank_0(monkeypatch, 40)
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
    # A second process joins, so the waiting thread ends: one left in C++ at exit would abort the
    # suite.
    joiner = distributed.dist.TCPStore("127.0.0.1", port, 2, False, timeout=timedelta(seconds=20))
    for waiter in (t for t in threading.enumerate() if "rendezvous" in t.name):
        waiter.join(20)
        assert not waiter.is_alive()
    del joiner


def test_real_mnist_beats_chance(real_run):
    """50 steps of the default standalone resnet (feat_dim 128) on the real MNIST: well above
    chance."""
    proc, run_dir = real_run
    check_ok(proc)
    summary = read_json(run_dir / "summary.json")
    print(f"real MNIST, {REAL_TRAIN_SAMPLES // 64} steps: acc {summary['acc']:.4f}")
    keys = ("train_size", "test_size", "feat_dim", "loss", "model")
    assert [summary[k] for k in keys] == [REAL_TRAIN_SAMPLES, 10000, 128, "standalone", "resnet"]
    assert summary["acc"] > 0.5, proc.stdout
    assert not (run_dir / "frames").exists() and not (run_dir / "train.png").exists()  # --no-plots


@pytest.mark.parametrize("extra", [[], ["--lr-cent", "0.5"]], ids=["lr", "centers-move"])
def test_a_learning_rate_that_moves_no_weight_is_refused_after_the_epoch(tmp_path, capsys, extra):
    """--lr 1e-30 passes the range check, but every update is below the float32 spacing of every
    weight: the run ended "done" having learned nothing. Moving centers (--lr-cent) do not make
    the model learn."""
    assert main.main([*QUICK, "--lr", "1e-30", *extra, "--out", str(tmp_path)]) == 1
    line = stderr_error_line(capsys.readouterr().err)
    assert line.startswith("error: no weight changed during epoch 1 (by 0, weights of norm ")
    assert line.endswith(
        "): --lr 1e-30 is too small to move float32 weights; no checkpoint was saved (none of an "
        "earlier epoch); give a larger --lr (or larger loss weights)"
    )
    run_dir = "standalone-digits-feat=2"
    assert listing(tmp_path).keys() == {run_dir, f"{run_dir}/args.json"}


@pytest.mark.parametrize(
    ("hook", "signum"), [("epoch_row", signal.SIGINT), ("end_epoch", signal.SIGTERM)]
)
def test_a_signal_between_epochs_says_so_in_one_line(tmp_path, monkeypatch, capsys, hook, signum):
    """During the evaluation or the writing after an epoch, a signal used to end the run
    silently."""
    original = getattr(main, hook)
    monkeypatch.setattr(
        main, hook, lambda *args: (os.kill(os.getpid(), signum), original(*args))[1]
    )
    assert main.main([*QUICK, "--out", str(tmp_path)]) == 128 + signum
    assert capsys.readouterr().err == (
        "interrupted after epoch 1's training (during its evaluation or writing); "
        "its checkpoint is saved, run the same command to resume\n"
    )
    run_dir = tmp_path / "standalone-digits-feat=2"
    assert (run_dir / "checkpoint.pt").is_file() and not (run_dir / "summary.json").exists()
    monkeypatch.undo()
    assert main.main([*QUICK, "--out", str(tmp_path)]) == 0 and (run_dir / "summary.json").is_file()


@pytest.fixture(scope="module")
def tiny_subprocesses(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """QUICK runs of main.py, started at once: stdout a pipe whose reader left (`main.py | head
    -1`), stdout closed (`main.py >&-`), and a matplotlib whose import raises what it raises for an
    unprivileged user under umask 777 (no writable cache folder; the suite runs as root)."""
    fake = tmp_path_factory.mktemp("fake") / "matplotlib"
    fake.mkdir()
    error = "Matplotlib requires access to a writable cache directory"
    (fake / "__init__.py").write_text(f"raise OSError({error!r})")
    read, write = os.pipe()
    os.close(read)
    ways = {
        "reader-left": dict(stdout=write),
        "closed": dict(preexec_fn=lambda: os.close(1)),
        "matplotlib": dict(stdout=-1, env={"PYTHONPATH": str(fake.parent)}),
    }
    procs = {}
    for way, kwargs in ways.items():
        out = tmp_path_factory.mktemp(way)
        command = [sys.executable, str(main.__file__), *QUICK, "--out", str(out)]
        env = {**subprocess_env(), **kwargs.pop("env", {})}
        procs[way] = subprocess.Popen(command, stderr=-1, text=True, env=env, **kwargs), out
    os.close(write)
    done = {}
    for way, (proc, out) in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        done[way] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), out
    return done


@pytest.mark.parametrize("way", ["reader-left", "closed"])
def test_stdout_that_cannot_be_written_does_not_stop_the_run(tiny_subprocesses, way):
    """A reader that left met a BrokenPipeError, a traceback, and the run died before its summary;
    a closed stdout made sys.stdout None, an AttributeError."""
    proc, out = tiny_subprocesses[way]
    assert (proc.returncode, proc.stderr) == (0, "")
    assert (out / "standalone-digits-feat=2" / "summary.json").is_file()


def test_matplotlib_that_cannot_start_is_one_line(tiny_subprocesses):
    proc, out = tiny_subprocesses["matplotlib"]
    assert proc.returncode == 1 and proc.stderr == (
        "error: matplotlib cannot be imported (Matplotlib requires access to a writable cache "
        "directory); check its install and that MPLCONFIGDIR or the home folder is writable\n"
    )
    assert not (out / "standalone-digits-feat=2").exists()
