"""Shared fixtures: tiny data sets written on the fly, a subprocess runner for main.py, and the
session's main.py runs, started together in the background as soon as the session begins.

Everything is sized for a small shared 2-core machine: the tiny MNIST has 200 train / 100 test
images, the tiny runs train two epochs of 7 steps, every process uses one thread. Images are
decoded by PIL (datasets.decode); nothing calls torchvision.io, so none of its warnings is filtered.
"""

from __future__ import annotations

import json
import os
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


# --------------------------------------------------------------------------------------------- IDX


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: 0x00 0x00 0x08 ndim, big-endian uint32 dims, raw bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return (
        bytes([0, 0, 8, array.ndim])
        + struct.pack(f">{array.ndim}I", *array.shape)
        + array.tobytes()
    )


def write_idx(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(idx_bytes(array))
    return path


def class_pattern_images(
    labels: np.ndarray, rng: np.random.Generator, side: int = 28, channels: int | None = None
) -> np.ndarray:
    """Easily separable images: class k is a bright 7x7 block at the k-th cell of a 4x4 grid
    (jittered by a pixel), on a background of faint noise."""
    n = len(labels)
    shape = (n, side, side) if channels is None else (n, side, side, channels)
    images = rng.integers(0, 40, size=shape).astype(np.uint8)
    cell = side // 4
    for i, k in enumerate(labels):
        row, col = divmod(int(k) % 16, 4)
        dy, dx = rng.integers(-1, 2, size=2)
        y0 = int(np.clip(row * cell + 1 + dy, 0, side - cell))
        x0 = int(np.clip(col * cell + 1 + dx, 0, side - cell))
        images[i, y0 : y0 + cell - 1, x0 : x0 + cell - 1] = 255
    return images


def balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    return labels.astype(np.uint8)


def write_tiny_mnist(root: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte; returns the arrays written."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    arrays = {}
    for split, n in (("train", MNIST_TRAIN), ("t10k", MNIST_TEST)):
        labels = balanced_labels(n, NUM_CLASSES, rng)
        images = class_pattern_images(labels, rng)
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    return arrays


@pytest.fixture
def tiny_mnist(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A fresh tiny MNIST (torchvision layout) under tmp_path/data; returns (data_dir, arrays)."""
    root = tmp_path / "data"
    return root, write_tiny_mnist(root)


# ----------------------------------------------------------------------------------- image folders

TREE_CLASSES = ("ant", "bee", "cat")


def write_image_tree(
    root: Path, mode: str = "L", side: int = 28, per_class: tuple[int, int] = (4, 2), seed: int = 0
) -> Path:
    """<root>/train/<class>/*.png and <root>/test/<class>/*.png, written with PIL ('L' or 'RGB')."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "test"), per_class):
        for k, cls in enumerate(TREE_CLASSES):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            labels = np.full(count, k)
            images = class_pattern_images(labels, rng, side, None if mode == "L" else 3)
            for i, image in enumerate(images):
                Image.fromarray(image, mode=mode).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture
def gray_tree(tmp_path: Path) -> Path:
    return write_image_tree(tmp_path / "gray", "L", 28)


@pytest.fixture
def rgb_tree(tmp_path: Path) -> Path:
    return write_image_tree(tmp_path / "rgb", "RGB", 32)


# --------------------------------------------------------------------------------------- main.py


def subprocess_env() -> dict[str, str]:
    """The CPU, one thread (more oversubscribe a small shared machine: 5-10x slower), no .pyc, Agg."""
    return dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONDONTWRITEBYTECODE="1",
        CUDA_VISIBLE_DEVICES="",
        MPLBACKEND="Agg",
    )


def run_script(
    script: str, args: list, cwd: Path | None = None, timeout: float = SUBPROCESS_TIMEOUT
) -> subprocess.CompletedProcess:
    """Run `python SCRIPT ARGS` in the repository root (or `cwd`) and capture its output."""
    command = [sys.executable, str(REPO / script), *map(str, args)]
    env = subprocess_env()
    return subprocess.run(
        command, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout, env=env
    )


def run_main(args: list, cwd: Path | None = None, timeout: float = SUBPROCESS_TIMEOUT):
    return run_script("main.py", args, cwd, timeout)


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
        if (
            leave_out is not None and (path == leave_out or leave_out in path.parents)
        ) or path.name in (".lock", ".lock.pid"):
            continue
        info = path.lstat()
        kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file"
        found[str(path.relative_to(root))] = (kind, info.st_size if kind == "file" else 0)
    return found


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
NAMED_RUN = "--loss cent --dataset mnist --model lenet++ --epochs 1 --train-samples 32".split()
NAMED_RUN += ["--batch-size", "16"]
REAL_TRAIN_SAMPLES = 3200  # 50 steps of 64 (100 steps took ~55 s on the loaded 2-core machine)


def shared_data_path() -> Path:
    return Path(os.environ.get("SCL_SHARED_DATA") or REPO.parent / "shared" / "data")


@pytest.fixture
def shared_data() -> Path:
    """The shared real data: $SCL_SHARED_DATA, else <repo>/../shared/data; skip only when absent."""
    path = shared_data_path()
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} is absent")
    return path


# ------------------------------------------------------------------------------ background runs
#
# The suite's main.py runs are started together, as soon as the session begins, and only those
# that the selected tests use: on a 2-core machine their imports, steps and plots then overlap
# each other and the in-process unit tests instead of queueing one after another.


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


BACKGROUND_FIXTURES = {"tiny_runs", "lenet_runs", "named_run", "projection_run", "real_run"}
BACKGROUND_FIXTURES |= {"truncated_run", "bad_data_dir_run"}
_needed: set[str] = set()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    _needed.clear()
    for item in items:
        _needed.update(set(getattr(item, "fixturenames", ())) & BACKGROUND_FIXTURES)


@pytest.fixture(scope="session", autouse=True)
def background(tmp_path_factory: pytest.TempPathFactory) -> Background:
    """Start every main.py run the selected tests need; kill any left running at the end."""
    bg = Background()
    if _needed:
        base = tmp_path_factory.mktemp("bg")
        mnist = base / "mnist-data"
        write_tiny_mnist(mnist)
        bg.paths["mnist"] = mnist
        if "real_run" in _needed and shared_data_path().is_dir():
            out = bg.paths["real"] = base / "real"
            args = ["--dataset", "mnist", "--data-dir", shared_data_path(), "--epochs", "1"]
            args += ["--train-samples", REAL_TRAIN_SAMPLES, "--feat-dim", "128"]
            bg.start("real", [*args, "--batch-size", "64", "--no-plots", "--out", out])
        for key, extra in (
            ("tiny", "--epochs 2"),
            ("lenet", "--model lenet++ --epochs 1 --train-samples 64 --no-plots"),
        ):
            if f"{key}_runs" in _needed:
                out = bg.paths[key] = base / ("runs" if key == "tiny" else key)
                for loss in ("xent", "cent", "standalone"):
                    args = ["--loss", loss, *TINY, "--data-dir", mnist, *extra.split()]
                    bg.start(f"{key}-{loss}", [*args, "--out", out])
        if "projection_run" in _needed:
            out = bg.paths["projection"] = base / "projection"
            args = "--loss standalone --feat-dim 16 --epochs 1 --train-samples 96".split()
            bg.start("projection", [*args, *TINY, "--data-dir", mnist, "--out", out])
        if "named_run" in _needed:
            out = bg.paths["named"] = base / "custom-out"
            command = [*NAMED_RUN, "--data-dir", mnist, "--no-plots", "--out", out]
            command += ["--name", "my run"]
            bg.paths["named-command"] = command
            bg.start("named", command)
        if "truncated_run" in _needed:
            data = base / "truncated-data"
            write_tiny_mnist(data)
            bad = bg.paths["truncated-file"] = data / "MNIST" / "raw" / "train-labels-idx1-ubyte"
            bad.write_bytes(bad.read_bytes()[:-7])
            out = bg.paths["truncated"] = base / "truncated-out"
            args = ["--dataset", "mnist", "--data-dir", data, "--epochs", "1", "--out", out]
            bg.start("truncated", args)
        if "bad_data_dir_run" in _needed:
            args = ["--data-dir", "/nonexistent", "--out", base / "bad-data-dir-out"]
            bg.start("bad-data-dir", args)
    yield bg
    bg.close()


def loss_runs(background: Background, key: str) -> dict[str, Path]:
    for loss in ("xent", "cent", "standalone"):
        check_ok(background.result(f"{key}-{loss}"))
    return {
        loss: background.paths[key] / f"{loss}-mnist-feat=2"
        for loss in ("xent", "cent", "standalone")
    }


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
    """(command, run folder) of a tiny lenet++ cent run, --name 'my run', --out custom-out, --no-plots."""
    check_ok(background.result("named"))
    return background.paths["named-command"], background.paths["named"] / "my run"


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
    return {
        "precision_at_1": sum(p1) / len(p1),
        "r_precision": sum(rp) / len(rp),
        "map_at_r": sum(ap) / len(ap),
    }
