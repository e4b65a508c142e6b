"""The fast path: batched augmentations, equality with the loader path, bitwise repeatable runs."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from conftest import REPO, metrics_without_seconds, subprocess_env

from batches import (
    CROP_PADDING,
    ROTATION_DEGREES,
    augment_batch,
    crop,
    loader_batches,
    rotate,
    tensor_batches,
)
from datasets import ImageData
from main import main


def noise(n: int, channels: int, side: int, seed: int = 0) -> torch.Tensor:
    """A float batch in [0, 1] of uint8 noise: asymmetric, so every flip, shift or rotation shows."""
    return uint8(n, channels, side, seed).float() / 255


def uint8(n: int, channels: int, side: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, side, side), generator=gen(seed), dtype=torch.uint8)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "ops", [(), ("rotate",), ("flip",), ("crop",), ("flip", "rotate"), ("flip", "crop")]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_augment_keeps_shape_dtype_range_and_is_seeded(ops, dtype):
    x = noise(16, 3, 32).to(dtype)
    out = augment_batch(x, ops, gen(1))
    assert out.shape == x.shape and out.dtype == dtype and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, augment_batch(x, ops, gen(1)))  # same generator state, same batch
    # no op: the identity; any op changes the batch, and another seed changes it otherwise
    assert torch.equal(out, x) == (ops == ()) == torch.equal(out, augment_batch(x, ops, gen(2)))


def test_rotation_angles_stay_within_5_degrees():
    """A blob 56 px right of the centre lands at radius 56 and the rotation angle: 256 draws span
    +-5 degrees, never beyond."""
    side, radius, n = 129, 56, 256
    centre = (side - 1) / 2
    x = torch.zeros(n, 1, side, side)
    x[:, :, 62:67, 64 + radius - 2 : 64 + radius + 3] = 1.0
    out = augment_batch(x, ("rotate",), gen(3))
    rows, cols = torch.meshgrid(*[torch.arange(side, dtype=torch.float64)] * 2, indexing="ij")
    mass = out[:, 0].double()
    assert (mass.sum((1, 2)) > 15).all()  # the blob survives the rotation
    cy = (mass * rows).sum((1, 2)) / mass.sum((1, 2)) - centre
    cx = (mass * cols).sum((1, 2)) / mass.sum((1, 2)) - centre
    angles = torch.rad2deg(torch.atan2(cy, cx))
    assert ((cx.hypot(cy) - radius).abs() < 1).all()
    assert angles.abs().max() <= ROTATION_DEGREES + 0.75  # ~0.7 px of centroid error at r=56
    assert angles.max() > 4 and angles.min() < -4  # both directions, up to the limit


def pil_batch(x: torch.Tensor, transform) -> torch.Tensor:
    """torchvision's per-sample PIL path (the loader pipeline's) on a uint8 batch, as floats in [0, 1]."""
    images = [transform(i, TF.to_pil_image(img)) for i, img in enumerate(x)]
    return torch.stack([TF.to_tensor(img) for img in images])


@pytest.mark.parametrize("channels", [1, 3])
def test_rotate_equals_torchvision_bilinear_rotation_for_the_same_angles(channels):
    """The fast path's grid_sample and torchvision's PIL rotation (BILINEAR) agree for the same angles
    up to 8-bit rounding, but along the rim (the zero fill blends differently)."""
    x8 = uint8(12, channels, 28, 4)
    degrees = torch.linspace(-ROTATION_DEGREES, ROTATION_DEGREES, len(x8))
    fast = rotate(x8.float() / 255, degrees)

    def pil(mode):
        return pil_batch(x8, lambda i, img: TF.rotate(img, float(degrees[i]), interpolation=mode))

    slow, nearest = pil(TF.InterpolationMode.BILINEAR), pil(TF.InterpolationMode.NEAREST)
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3))
    assert (fast - slow)[inner].abs().max() <= 1.5 / 255
    assert (fast - nearest)[inner].abs().max() > 20 / 255  # it can tell bilinear from nearest
    opposite = rotate(x8.float() / 255, -degrees)
    assert (opposite - slow)[inner][:4].abs().max() > 20 / 255  # and one direction from the other


def test_flip_is_torchvision_hflip_where_a_uniform_draw_is_below_one_half():
    """RandomHorizontalFlip(0.5): an image is flipped (as by hflip) where its uniform draw is < 0.5."""
    x8 = uint8(10, 3, 32, 6)
    flipped = torch.rand(10, generator=gen()) < 0.5
    assert 0 < flipped.sum() < 10
    slow = pil_batch(x8, lambda i, img: TF.hflip(img) if flipped[i] else img)
    assert torch.equal(augment_batch(x8.float() / 255, ("flip",), gen()), slow)


def test_crop_equals_torchvision_padded_crop_for_the_same_offsets():
    x8 = uint8(9, 3, 32, 8)
    offsets = torch.tensor([[0, 8, 4, 1, 7, 3, 0, 8, 5], [8, 0, 4, 6, 2, 3, 0, 8, 1]])
    top, left = offsets.tolist()
    slow = pil_batch(x8, lambda i, img: TF.crop(TF.pad(img, CROP_PADDING), top[i], left[i], 32, 32))
    assert torch.equal(crop(x8.float() / 255, offsets), slow)


def test_crop_is_a_shifted_window_of_the_zero_padded_input():
    x = noise(32, 3, 32)
    out = augment_batch(x, ("crop",), gen())
    windows = F.pad(x, (CROP_PADDING,) * 4).unfold(2, 32, 1).unfold(3, 32, 1)  # n c dy dx h w
    found = (windows == out[:, :, None, None]).all(5).all(4).all(1).flatten(1)  # n, offset
    assert found.sum(1).tolist() == [1] * len(x)  # each sample one window of the padded input
    assert len(set(found.int().argmax(1).tolist())) > 8  # shifted, by different amounts


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("channels", [1, 3])
def test_tensor_batches_equal_loader_batches_without_augmentation(workers, channels):
    g = gen(channels)
    n = 70  # 4 full batches of 16; the last 6 samples are dropped, as in the study
    data = ImageData(uint8(n, channels, 28, channels), torch.randint(0, 10, (n,), generator=g))
    order = torch.randperm(n, generator=g)
    cpu = torch.device("cpu")
    for start in (0, 2):
        fast = list(tensor_batches(data, order, 16, (), gen(), start=start))
        loader = list(loader_batches(data, order, 16, (), gen(), workers, cpu, start=start))
        assert len(fast) == len(loader) == 4 - start
        assert torch.equal(torch.cat([y for _, y in fast]), data.labels[order[16 * start : 64]])
        for (xf, yf), (xl, yl) in zip(fast, loader):
            assert xf.dtype == xl.dtype == torch.float32
            assert torch.equal(xf, xl) and torch.equal(yf, yl)


def run_args(out: Path, pipeline: str) -> list[str]:
    args = "--dataset digits --train-samples 64 --batch-size 32 --epochs 2 --model lenet++".split()
    args += ["--no-plots", "--device", "cpu", "--pipeline", pipeline, "--out", str(out)]
    return args + (["--workers", "0"] if pipeline == "loader" else [])  # the loader's flag only


@pytest.mark.parametrize("pipeline", ["fast", "loader"])
def test_training_is_bitwise_repeatable(tmp_path, pipeline):
    """Two runs with the same seed (the digits' rotation on), one in another process (another hash
    seed) while this one trains, give the same metrics, weights, centers and momentum."""
    command = [sys.executable, str(REPO / "main.py"), *run_args(tmp_path / "a", pipeline)]
    options = dict(cwd=REPO, env=subprocess_env(), stdout=-1, stderr=-2, text=True)
    proc = subprocess.Popen(command, **options)
    assert main(run_args(tmp_path / "b", pipeline)) == 0
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    a, b = (tmp_path / name / "standalone-digits-feat=2" for name in ("a", "b"))
    rows = metrics_without_seconds(a)
    assert len(rows) == 2 and rows == metrics_without_seconds(b)
    assert all(math.isfinite(float(row["train_loss"])) for row in rows)
    ckpts = [torch.load(r / "checkpoint.pt", weights_only=True) for r in (a, b)]
    parts = [(c["model"], c["objective"], c["optimizer"]["state"]) for c in ckpts]
    assert len(parts[0][2]) > 5  # momentum buffers
    torch.testing.assert_close(*parts, rtol=0, atol=0)  # bit for bit
