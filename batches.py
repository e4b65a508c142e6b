"""Training batches: the study's augmentations as batched tensor ops on the training device (the fast
path), or torchvision's per-sample transforms in a DataLoader (`--pipeline loader`, as the study).
MNIST and digits rotate within +-5 degrees, Fashion-MNIST also flips, CIFAR-10 flips and crops 32
pixels of the 4-zero padded image."""

import os
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Generator, Tensor
from torch import device as Device

from datasets import ImageData

ROTATION_DEGREES = 5.0
CROP_PADDING = 4
Ops = Sequence[str]  # augmentation names, as in datasets.AUGMENTATIONS


def flip(x: Tensor, flipped: Tensor) -> Tensor:
    """Mirror the images whose entry of the boolean `flipped` (N) is set (torchvision's hflip)."""
    return torch.where(flipped[:, None, None, None], x.flip(-1), x)


def rotate(x: Tensor, degrees: Tensor) -> Tensor:
    """Each image turned counter-clockwise by its angle in `degrees` (N) about its centre, bilinear, zero fill (torchvision's rotate)."""
    angle = torch.deg2rad(degrees.to(x.dtype))
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    # affine_grid maps output to input coordinates (x right, y down): there a counter-clockwise turn's inverse is [[cos, -sin], [sin, cos]]
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def crop(x: Tensor, offsets: Tensor) -> Tensor:
    """The image-sized window of each image's CROP_PADDING-zero-padded copy at (row, column) `offsets` (2 x N, each in
    [0, 2 * CROP_PADDING]): torchvision's RandomCrop(size, padding) for given draws."""
    n, _, h, w = x.shape
    # N x H x 1, and cols N x 1 x W: N x H x W windows
    rows = (offsets[0][:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (offsets[1][:, None] + torch.arange(w, device=x.device))[:, None, :]
    # N x H x W x C: the windows' pixels gathered by one index
    padded = F.pad(x, (CROP_PADDING,) * 4).permute(0, 2, 3, 1)
    return padded[torch.arange(n, device=x.device)[:, None, None], rows, cols].permute(0, 3, 1, 2)


def augment_batch(x: Tensor, augmentations: Ops, generator: Generator) -> Tensor:
    """The study's random augmentations of a whole float batch (N x C x H x W) on its device, drawn from `generator` (on
    that device: nothing waits for the host) as torchvision's RandomHorizontalFlip(0.5), RandomRotation(5, BILINEAR), RandomCrop(padding=4)."""
    n, device = x.shape[0], generator.device
    uniform = partial(torch.rand, n, generator=generator, device=device)
    for op in augmentations:
        if op == "flip":
            x = flip(x, uniform() < 0.5)
        elif op == "rotate":
            x = rotate(x, (uniform() * 2 - 1) * ROTATION_DEGREES)
        elif op == "crop":
            high = 2 * CROP_PADDING + 1
            x = crop(x, torch.randint(0, high, (2, n), generator=generator, device=device))
    return x


def tensor_batches(
    data: ImageData,
    order: Tensor,
    batch_size: int,
    augmentations: Ops,
    generator: Generator,
    start: int = 0,
    rank: int = 0,
    world: int = 1,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Fast path: the full batches of `data` (on the training device) in `order`, augmented there (the study's drop_last=True).
    With `world` processes each global batch is augmented whole (one process's draws) and this rank gets its `rank`-th slice."""
    order = order.to(data.images.device)
    rows = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
    for i in range(start * batch_size, len(order) - batch_size + 1, batch_size):
        idx = order[i : i + batch_size]
        x = augment_batch(data.images[idx].float().div_(255), augmentations, generator)
        yield x[rows], data.labels[idx[rows]]


def full_batches(num_samples: int, batch_size: int) -> int:
    """Training steps per epoch: the last partial batch is dropped (the study's drop_last=True)."""
    return num_samples // batch_size


def shard_order(order: Tensor, batch_size: int, rank: int, world: int) -> Tensor:
    """This rank's indices: the rank-th of `world` equal slices of every full global batch of `order` (batch_size % world == 0)."""
    batches = order[: full_batches(len(order), batch_size) * batch_size].view(-1, batch_size)
    return batches[:, rank * batch_size // world : (rank + 1) * batch_size // world].reshape(-1)


def transformed(
    transform: Callable[[Tensor], Tensor], batch: list[tuple[Tensor, Tensor]]
) -> tuple[Tensor, Tensor]:
    """The loader's collate_fn: torchvision's per-sample transforms (run in its workers), then one batch."""
    return torch.stack([transform(x) for x, _ in batch]), torch.stack([y for _, y in batch])


def loader_batches(
    data: ImageData,
    order: Tensor,
    batch_size: int,
    augmentations: Ops,
    generator: Generator,
    workers: int,
    device: Device,
    start: int = 0,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Loader path: a DataLoader over per-sample transforms sampling `order` of CPU data, the last partial batch dropped (the study's)."""
    import torchvision.transforms as T  # imported when used, as in load_torchvision

    size = data.images.shape[-1]
    ops = dict(flip=T.RandomHorizontalFlip(), crop=T.RandomCrop(size, padding=CROP_PADDING))
    ops["rotate"] = T.RandomRotation(ROTATION_DEGREES, T.InterpolationMode.BILINEAR)
    # the study's PIL path
    transform = T.Compose([T.ToPILImage(), *(ops[a] for a in augmentations), T.ToTensor()])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.images, data.labels),
        batch_size,
        sampler=order[start * batch_size :].tolist(),
        num_workers=workers,
        collate_fn=partial(transformed, transform),
        drop_last=True,
        pin_memory=device.type == "cuda",
        generator=generator,
    )
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)
