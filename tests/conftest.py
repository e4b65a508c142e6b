"""Shared fixtures: tiny data sets written on the fly, a subprocess runner for main.py, and the
session's main.py runs, started together in the background as soon as the session begins.

Everything is sized for a small shared 2-core machine: the tiny MNIST has 200 train / 100 test
images, the tiny runs train two epochs of 7 steps, every process uses one thread. Images are
decoded by PIL (datasets.decode); nothing calls torchvision.io, so none of its warnings is filtered.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

torch.set_num_threads(1)  # in-process tests too: oversubscribed threads are far slower here

NUM_CLASSES = 10
MNIST_TRAIN = 200
MNIST_TEST = 100
SUBPROCESS_TIMEOUT = 300


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: 0x00 0x00 0x08 ndim, big-endian uint32 dims, raw bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(idx_bytes(array))
    return path


def class_pattern_images(
    labels: np.ndarray, rng: np.random.Generator, side: int = 28, channels: int | None = None
) -> np.ndarray:
    """Easily separable images: class k is a bright 7x7 block at the k-th cell of a 4x4 grid
    (jittered by a pixel), on a background of faint noise."""
    shape = (len(labels), side, side) if channels is None else (len(labels), side, side, channels)
    images = rng.integers(0, 40, size=shape).astype(np.uint8)
    cell = side // 4
    for i, k in enumerate(labels):
        corner = np.array(divmod(int(k) % 16, 4)) * cell + 1 + rng.integers(-1, 2, size=2)
        y0, x0 = np.clip(corner, 0, side - cell)
        images[i, y0 : y0 + cell - 1, x0 : x0 + cell - 1] = 255
    return images


def write_tiny_mnist(root: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte of balanced classes; returns
    the arrays written."""
    rng, arrays = np.random.default_rng(seed), {}
    for split, n in (("train", MNIST_TRAIN), ("t10k", MNIST_TEST)):
        labels = np.arange(n) % NUM_CLASSES
        rng.shuffle(labels)
        arrays[f"{split}_labels"] = labels = labels.astype(np.uint8)
        arrays[f"{split}_images"] = class_pattern_images(labels, rng)
        for kind, idx in (("images", 3), ("labels", 1)):
            path = root / "MNIST" / "raw" / f"{split}-{kind}-idx{idx}-ubyte"
            write_idx(path, arrays[f"{split}_{kind}"])
    return arrays


@pytest.fixture
def tiny_mnist(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A fresh tiny MNIST (torchvision layout) under tmp_path/data; returns (data_dir, arrays)."""
    root = tmp_path / "data"
    return root, write_tiny_mnist(root)


TREE_CLASSES = ("ant", "bee", "cat")


def write_image_tree(
    root: Path, mode: str = "L", side: int = 28, per_class: tuple[int, int] = (4, 2), seed: int = 0
) -> Path:
    """<root>/train/<class>/*.png and <root>/test/<class>/*.png, written with PIL ('L' or 'RGB')."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "test"), per_class):
        for k, cls in enumerate(TREE_CLASSES):
            (folder := root / split / cls).mkdir(parents=True, exist_ok=True)
            images = class_pattern_images([k] * count, rng, side, None if mode == "L" else 3)
            for i, image in enumerate(images):
                Image.fromarray(image, mode=mode).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture
def gray_tree(tmp_path: Path) -> Path:
    return write_image_tree(tmp_path / "gray", "L", 28)


@pytest.fixture
def rgb_tree(tmp_path: Path) -> Path:
    return write_image_tree(tmp_path / "rgb", "RGB", 32)


def subprocess_env() -> dict[str, str]:
    """The CPU, one thread (more oversubscribe a small shared machine: 5-10x slower), no .pyc, Agg."""
    settings = dict(OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", CUDA_VISIBLE_DEVICES="")
    return dict(os.environ, **settings, MPLBACKEND="Agg")


def run_script(
    script: str, args: list, cwd: Path | None = None, timeout: float = SUBPROCESS_TIMEOUT
) -> subprocess.CompletedProcess:
    """Run `python SCRIPT ARGS` in the repository root (or `cwd`) and capture its output."""
    command = [sys.executable, str(REPO / script), *map(str, args)]
    options = dict(capture_output=True, text=True, timeout=timeout, env=subprocess_env())
    return subprocess.run(command, cwd=cwd or REPO, **options)


def stderr_error_line(stderr: str) -> str:
    """The one error line of a failed command (argparse prints its usage block above it)."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr
    assert stderr.rstrip().splitlines()[-1] == errors[0], stderr
    return errors[0]


def listing(root: Path, leave_out: Path | None = None) -> dict[str, tuple[str, int]]:
    """path -> (kind, size) of everything under `root` but `leave_out` and the lock files (.lock,
    .lock.pid, which any command that reaches a run folder takes)."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.name in (".lock", ".lock.pid") or leave_out in (path, *path.parents):
            continue
        kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file"
        found[str(path.relative_to(root))] = (kind, path.lstat().st_size if kind == "file" else 0)
    return found


def metrics_without_seconds(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv's rows without `seconds`, the one column that differs between equal runs."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def write_finished_decoy(run_dir: Path) -> Path:
    """A finished run as main.py leaves it (args.json, checkpoint.pt, metrics.csv, summary.json)."""
    run_dir.mkdir(parents=True)
    args = dict(loss="standalone", dataset="digits", feat_dim=2, name=run_dir.name)
    args["out"] = str(run_dir.parent)
    (run_dir / "args.json").write_text(json.dumps(args))
    (run_dir / "checkpoint.pt").write_bytes(b"weights" * 100)
    (run_dir / "metrics.csv").write_text("epoch,test_acc\n1,0.9\n")
    (run_dir / "summary.json").write_text(json.dumps({**args, "acc": 0.9}))
    return run_dir


def check_ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
    return proc


TINY = ["--dataset", "mnist", "--batch-size", "32"]  # the default resnet: the fastest to train here
TINY_ARGS = " ".join(TINY) + " --data-dir {mnist}"
LOSSES = ("xent", "cent", "standalone")
NAMED_RUN = "--loss cent --dataset mnist --model lenet++ --epochs 1 --train-samples 32".split()
NAMED_RUN += ["--batch-size", "16"]
REAL_TRAIN_SAMPLES = 3200  # 50 steps of 64 (100 steps took ~55 s on the loaded 2-core machine)


def shared_data_path() -> Path:
    return Path(os.environ.get("SCL_SHARED_DATA") or REPO.parent / "shared" / "data")


# The selected tests' main.py runs start together as the session begins: on a 2-core machine
# they then overlap each other and the in-process tests instead of queueing.


class Background:
    """Subprocesses started now and waited for later; each result is kept once collected."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.results: dict[str, subprocess.CompletedProcess] = {}
        self.paths: dict[str, Path] = {}

    def start(self, key: str, args: list) -> None:
        command = [sys.executable, str(REPO / "main.py"), *map(str, args)]
        self.procs[key] = subprocess.Popen(
            command, cwd=REPO, stdout=-1, stderr=-1, text=True, env=subprocess_env()
        )

    def result(self, key: str, timeout: float = SUBPROCESS_TIMEOUT) -> subprocess.CompletedProcess:
        if key not in self.results:
            proc = self.procs[key]
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                err += f"\n[test harness: killed after {timeout} s]"
            self.results[key] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        return self.results[key]

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def per_loss(key: str, extra: str) -> dict[str, str]:
    return {f"{key}-{loss}": f"--loss {loss} {TINY_ARGS} {extra}" for loss in LOSSES}


# fixture -> {key: main.py's arguments but --out} ({mnist}: the tiny MNIST, {truncated_data}: one
# whose train labels lost 7 bytes, {shared}: the shared data; "real" runs only where that is present)
RUNS = {
    "tiny_runs": per_loss("tiny", "--epochs 2"),
    "lenet_runs": per_loss("lenet", "--model lenet++ --epochs 1 --train-samples 64 --no-plots"),
    "projection_run": {
        "projection": f"--loss standalone --feat-dim 16 --epochs 1 --train-samples 96 {TINY_ARGS}"
    },
    "named_run": {"named": " ".join(NAMED_RUN) + " --data-dir {mnist} --no-plots --name 'my run'"},
    "truncated_run": {"truncated": "--dataset mnist --data-dir {truncated_data} --epochs 1"},
    "bad_data_dir_run": {"bad-data-dir": "--data-dir /nonexistent"},
    "real_run": {
        "real": "--dataset mnist --data-dir {shared} --epochs 1 --feat-dim 128 --batch-size 64"
        f" --no-plots --train-samples {REAL_TRAIN_SAMPLES}"
    },
}
_needed: set[str] = set()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    _needed.clear()
    for item in items:
        _needed.update(set(getattr(item, "fixturenames", ())) & set(RUNS))


@pytest.fixture(scope="session", autouse=True)
def background(tmp_path_factory: pytest.TempPathFactory) -> Background:
    """Start every main.py run the selected tests need; kill any left running at the end."""
    bg = Background()
    if _needed:
        base = tmp_path_factory.mktemp("bg")
        places = dict(mnist=base / "mnist", truncated_data=base / "truncated-data")
        bg.paths.update(places, shared=shared_data_path())
        for data in places.values():
            write_tiny_mnist(data)
        bad = bg.paths["truncated-file"] = base / "truncated-data/MNIST/raw/train-labels-idx1-ubyte"
        bad.write_bytes(bad.read_bytes()[:-7])
        for fixture in _needed - (set() if bg.paths["shared"].is_dir() else {"real_run"}):
            for key, args in RUNS[fixture].items():
                out = bg.paths[key] = base / "runs" / key
                command = [a.format(**bg.paths) for a in shlex.split(args)] + ["--out", out]
                bg.start(key, command)
                bg.paths[f"{key}-command"] = command
    yield bg
    bg.close()


def loss_runs(background: Background, key: str) -> dict[str, Path]:
    for loss in LOSSES:
        check_ok(background.result(f"{key}-{loss}"))
    return {loss: background.paths[f"{key}-{loss}"] / f"{loss}-mnist-feat=2" for loss in LOSSES}


@pytest.fixture(scope="session")
def tiny_runs(background: Background) -> dict[str, Path]:
    """loss -> a finished tiny 2-D resnet run (2 epochs of 7 steps, frames on); copy to change it."""
    return loss_runs(background, "tiny")


@pytest.fixture(scope="session")
def lenet_runs(background: Background) -> dict[str, Path]:
    """loss -> a finished lenet++ smoke run (its recipe, 1 epoch of 2 steps on the tiny MNIST)."""
    return loss_runs(background, "lenet")


@pytest.fixture(scope="session")
def named_run(background: Background) -> tuple[list, Path]:
    """(command, run folder) of a tiny lenet++ cent run, --name 'my run', its own --out, --no-plots."""
    check_ok(background.result("named"))
    paths = background.paths
    return [*paths["named-command"], "--name", "my run"], paths["named"] / "my run"


@pytest.fixture(scope="session")
def projection_run(background: Background) -> Path:
    """A tiny standalone run with --feat-dim 16 (projections instead of frames)."""
    check_ok(background.result("projection"))
    return background.paths["projection"] / "standalone-mnist-feat=16"


@pytest.fixture(scope="session")
def truncated_run(background: Background) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """main.py on a tiny MNIST whose train labels file lost 7 bytes: (process, the bad file, --out)."""
    paths = background.paths
    return background.result("truncated"), paths["truncated-file"], paths["truncated"]


@pytest.fixture(scope="session")
def bad_data_dir_run(background: Background) -> subprocess.CompletedProcess:
    """main.py --data-dir /nonexistent."""
    return background.result("bad-data-dir")


@pytest.fixture(scope="session")
def real_run(background: Background) -> tuple[subprocess.CompletedProcess, Path]:
    """(process, run folder): the default standalone resnet, 50 steps on the real MNIST, feat_dim 128."""
    if "real" not in background.procs:
        pytest.skip(f"shared data folder {shared_data_path()} is absent")
    return background.result("real"), background.paths["real"] / "standalone-mnist-feat=128"


def reference_retrieval(features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """P@1, R-precision and MAP@R by plain loops, neighbours sorted by (distance, index)."""
    x, y = features.double().tolist(), labels.tolist()
    p1, rp, ap = [], [], []
    for i in range(len(x)):
        r = y.count(y[i]) - 1
        if r == 0:
            continue
        others = sorted(
            (sum((a - b) ** 2 for a, b in zip(x[i], x[j])), j) for j in range(len(x)) if j != i
        )
        hits = [y[j] == y[i] for _, j in others[:r]]
        p1.append(float(hits[0]))
        rp.append(sum(hits) / r)
        ap.append(sum(sum(hits[: n + 1]) / (n + 1) for n in range(r) if hits[n]) / r)
    names = ("precision_at_1", "r_precision", "map_at_r")
    return {name: sum(v) / len(v) for name, v in zip(names, (p1, rp, ap))}
