"""The fast path: batched augmentations, equality with the loader path, bitwise repeatable runs."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from datasets import CROP_PADDING, ROTATION_DEGREES, ImageData, augment_batch, loader_batches, tensor_batches  # noqa: E402


def noise(n: int, channels: int, side: int, seed: int = 0) -> torch.Tensor:
    """A float batch in [0, 1] of uint8 noise: asymmetric, so every flip, shift or rotation shows."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, side, side), generator=g, dtype=torch.uint8).float() / 255


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------ augmentations


@pytest.mark.parametrize("ops", [("rotate",), ("flip",), ("crop",), ("flip", "rotate"), ("flip", "crop")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_augment_keeps_shape_dtype_range_and_is_seeded(ops, dtype):
    x = noise(16, 3, 32).to(dtype)
    out = augment_batch(x, ops, gen(1))
    assert out.shape == x.shape and out.dtype == dtype
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x)
    assert torch.equal(out, augment_batch(x, ops, gen(1)))  # same generator state, same batch
    assert not torch.equal(out, augment_batch(x, ops, gen(2)))


def test_augment_empty_is_identity():
    x = noise(4, 1, 28)
    assert torch.equal(augment_batch(x, (), gen()), x)


def test_rotate_changes_pixels():
    x = noise(64, 1, 28)
    out = augment_batch(x, ("rotate",), gen())
    changed = [not torch.equal(out[i], x[i]) for i in range(len(x))]
    # Angles under ~1.4 degrees move no pixel of a 28x28 image by half a pixel: most, not all, change.
    assert sum(changed) >= len(x) // 2
    assert len({tuple(out[i].flatten().tolist()) for i in range(len(x))}) > len(x) // 2  # different angles per sample


def test_rotation_angles_stay_within_5_degrees():
    """A 5x5 bright blob 56 pixels right of the centre of a 129x129 image lands on the circle of
    radius 56 at the rotation angle; 256 draws span +-5 degrees but never go beyond."""
    side, radius, n = 129, 56, 256
    centre = (side - 1) / 2
    x = torch.zeros(n, 1, side, side)
    x[:, :, 62:67, 64 + radius - 2 : 64 + radius + 3] = 1.0
    out = augment_batch(x, ("rotate",), gen(3))
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64), indexing="ij")
    mass = out[:, 0].double()
    assert (mass.sum((1, 2)) > 15).all()  # the blob survives nearest-neighbour sampling
    cy = (mass * rows).sum((1, 2)) / mass.sum((1, 2)) - centre
    cx = (mass * cols).sum((1, 2)) / mass.sum((1, 2)) - centre
    angles = torch.rad2deg(torch.atan2(cy, cx))
    assert ((cx.hypot(cy) - radius).abs() < 1).all()
    assert angles.abs().max() <= ROTATION_DEGREES + 0.75  # 0.75 degrees ~ 0.7 px of centroid error at r=56
    assert angles.max() > 4 and angles.min() < -4  # both directions, up to the limit


def test_rotate_matches_torchvision_for_its_angle():
    """The blob's measured angle, applied with torchvision's rotate, gives nearly the same image."""
    import torchvision.transforms.functional as TF

    x = torch.zeros(1, 1, 65, 65)
    x[:, :, 30:35, 55:60] = 1.0
    out = augment_batch(x, ("rotate",), gen(5))
    best = min(
        (float((TF.rotate(x, angle / 10, interpolation=TF.InterpolationMode.NEAREST) - out).abs().sum()), angle / 10)
        for angle in range(-60, 61)
    )
    assert abs(best[1]) <= ROTATION_DEGREES and best[0] <= 4  # a few border pixels of the blob may differ


def test_crop_is_a_shifted_window_of_the_zero_padded_input():
    x = noise(32, 3, 32)
    out = augment_batch(x, ("crop",), gen())
    padded = F.pad(x, (CROP_PADDING,) * 4)
    h, w = x.shape[-2:]
    offsets = []
    for i in range(len(x)):
        found = [
            (dy, dx)
            for dy in range(2 * CROP_PADDING + 1)
            for dx in range(2 * CROP_PADDING + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + h, dx : dx + w])
        ]
        assert len(found) == 1, f"sample {i}: not a window of the padded input"
        offsets.append(found[0])
    assert len(set(offsets)) > 8  # content shifts, by different amounts per sample
    assert any(off != (CROP_PADDING, CROP_PADDING) for off in offsets)


def test_flip_flips_about_half_of_a_batch():
    x = noise(64, 1, 28)
    out = augment_batch(x, ("flip",), gen())
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(len(x))]
    kept = [torch.equal(out[i], x[i]) for i in range(len(x))]
    assert all(f != k for f, k in zip(flipped, kept))  # each sample is exactly one of the two
    assert 10 <= sum(flipped) <= 54


def test_fast_path_runs_on_uint8_like_real_data():
    """tensor_batches scales uint8 to [0, 1] floats and augments; labels follow the order."""
    g = gen(7)
    data = ImageData(torch.randint(0, 256, (40, 1, 28, 28), generator=g, dtype=torch.uint8), torch.arange(40))
    order = torch.randperm(40, generator=g)
    batches = list(tensor_batches(data, order, 16, ("rotate",), gen()))
    assert [len(y) for _, y in batches] == [16, 16, 8]
    assert torch.equal(torch.cat([y for _, y in batches]), order)
    for x, _ in batches:
        assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1


# ------------------------------------------------------------------------ fast path == loader path


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("channels", [1, 3])
def test_tensor_batches_equal_loader_batches_without_augmentation(workers, channels):
    g = gen(channels)
    n = 70  # 4 full batches of 16 and one of 6
    data = ImageData(torch.randint(0, 256, (n, channels, 28, 28), generator=g, dtype=torch.uint8), torch.randint(0, 10, (n,), generator=g))
    order = torch.randperm(n, generator=g)
    for start in (0, 2):
        fast = list(tensor_batches(data, order, 16, (), gen(), start=start))
        loader = list(loader_batches(data, order, 16, (), gen(), workers, torch.device("cpu"), start=start))
        assert len(fast) == len(loader) == 5 - start
        for (xf, yf), (xl, yl) in zip(fast, loader):
            assert xf.dtype == xl.dtype == torch.float32
            assert torch.equal(xf, xl) and torch.equal(yf, yl)


# ------------------------------------------------------------------------------- repeatable runs


def start_main(out: Path, pipeline: str) -> subprocess.Popen:
    args = ["--dataset", "digits", "--train-samples", "96", "--batch-size", "32", "--epochs", "2", "--no-plots"]
    args += ["--device", "cpu", "--pipeline", pipeline, "--workers", "0", "--out", str(out), "--name", "run"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # two runs side by side on few cores: no spinning OpenMP threads
    return subprocess.Popen(
        [sys.executable, str(REPO / "main.py"), *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def metrics_without_seconds(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and "seconds" in rows[0]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


@pytest.mark.parametrize("pipeline", ["fast", "loader"])
def test_training_is_bitwise_repeatable(tmp_path, pipeline):
    """Two runs with the same seed (the digits' rotation on) give the same metrics and weights."""
    procs = [start_main(tmp_path / name, pipeline) for name in ("a", "b")]  # side by side: half the wait
    for proc in procs:
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, output[-3000:]
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    rows = metrics_without_seconds(a)
    assert len(rows) == 2 and rows == metrics_without_seconds(b)
    assert all(math.isfinite(float(row["train_loss"])) for row in rows)
    ckpt_a = torch.load(a / "checkpoint.pt", weights_only=True)
    ckpt_b = torch.load(b / "checkpoint.pt", weights_only=True)
    for part in ("model", "objective"):
        assert ckpt_a[part].keys() == ckpt_b[part].keys()
        for key, tensor in ckpt_a[part].items():
            assert torch.equal(tensor, ckpt_b[part][key]), f"{part}.{key} differs"
    for state_a, state_b in zip(ckpt_a["optimizer"]["state"].values(), ckpt_b["optimizer"]["state"].values()):
        assert torch.equal(state_a["momentum_buffer"], state_b["momentum_buffer"])
