"""Data sets as uint8 tensors, and the study's augmentations as batched tensor ops.

Every data set is decoded once into `images` (N x C x H x W, uint8) and `labels` (N, int64). The
fast path keeps both on the training device and augments whole batches there; the loader path
(`--pipeline loader`) feeds the same tensors through torchvision's per-sample PIL transforms and a
DataLoader with workers, the way the study did.

Augmentations (as in the study): MNIST and digits rotate within +-5 degrees; Fashion-MNIST flips
horizontally and rotates; CIFAR-10 flips and takes a random 32-pixel crop of the image padded by 4
zeros. Test data is never augmented. Pixels are scaled to [0, 1], with no normalisation.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "folder")
ALIASES = {"cifar-10": "cifar10", "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist"}
AUGMENTATIONS = {
    "digits": ("rotate",),
    "mnist": ("rotate",),
    "fashion-mnist": ("flip", "rotate"),
    "cifar10": ("flip", "crop"),
    "folder": (),
}
ROTATION_DEGREES = 5.0
DIGITS_SIDE = 16  # the bundled 8x8 digits, upsampled: 16x16 keeps every stroke at a third of 28x28's cost
CROP_PADDING = 4
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DIGIT_CLASSES = [str(d) for d in range(10)]
# Sub-folders of --data-dir searched for an image-folder tree (<tree>/train/<class>/*, <tree>/test/<class>/*).
TREE_FOLDERS = {
    "mnist": ("mnist", "MNIST-jpg", "mnist-jpg"),
    "fashion-mnist": ("fashion-mnist", "FashionMNIST-jpg", "fashion-mnist-jpg"),
    "cifar10": ("cifar10", "cifar10-jpg", "cifar-10", "CIFAR10"),
}
IDX_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
# The shape of one image and the class count of the named data sets whose models and names assume them.
KNOWN_SHAPES = {"mnist": ((1, 28, 28), 10), "fashion-mnist": ((1, 28, 28), 10)}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}


class DataError(Exception):
    """A data problem to report as one line (what is wrong, which file, what to do); exit code 1."""


@dataclass
class ImageData:
    images: torch.Tensor  # N x C x H x W, uint8
    labels: torch.Tensor  # N, int64

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device | str) -> ImageData:
        return ImageData(self.images.to(device), self.labels.to(device))


@dataclass
class Dataset:
    name: str
    train: ImageData
    test: ImageData
    classes: list[str]
    augmentations: tuple[str, ...]
    source: str  # what was read, in words: the format and the folder (the start-up line, summary.json)
    files: list[str] = field(default_factory=list)  # the files or folders read (summary.json's data_files)

    @property
    def channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 images (N x C x H x W) on the [0, 1] scale,
    exact, from each channel's 256-bin histogram (no float copy of the data set). A constant
    channel gets std 1, not 0, so that standardising by it stays finite."""
    levels = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1).cpu(), minlength=256).double()
        p = counts / counts.sum()
        mean = (p * levels).sum()
        std = (p * (levels - mean) ** 2).sum().sqrt().item()
        means.append(mean.item())
        stds.append(std if std > 0 else 1.0)
    return means, stds


def split_validation(data: ImageData, fraction: float, seed: int) -> tuple[ImageData, ImageData]:
    """Hold out round(fraction * N) train samples (at least one), chosen by a permutation seeded by
    `seed`; returns (train, validation), disjoint."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + 7919))
    held = max(1, round(fraction * len(data)))
    val, train = order[:held].sort().values, order[held:].sort().values
    return ImageData(data.images[train], data.labels[train]), ImageData(data.images[val], data.labels[val])


def parse_class_list(spec: str, classes: Sequence[str]) -> list[int]:
    """The class indices `spec` names, sorted: comma-separated indices (`0,2,5`), inclusive ranges
    (`0-4`) or class names (`Trouser,Bag`, any case), mixed as you like. ValueError, with the reason
    in words, for an empty list, an unknown name or index, a reversed range, a class named twice,
    fewer than two classes (the losses compare classes) or every class (nothing left unseen)."""
    lowered = {c.lower(): i for i, c in enumerate(classes)}
    chosen: list[int] = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            raise ValueError(f"--train-classes {spec!r} has an empty entry; give indices, ranges such as 0-4, or class names")
        if token.isdigit():
            picked = [int(token)]
        elif re.fullmatch(r"\d+-\d+", token):
            first, last = map(int, token.split("-"))
            if first > last:
                raise ValueError(f"--train-classes: the range {token} is reversed; write {last}-{first}")
            picked = list(range(first, last + 1))
        elif token.lower() in lowered:
            picked = [lowered[token.lower()]]
        else:
            raise ValueError(f"--train-classes: no class {token!r}; the classes are {', '.join(classes)} (or indices 0-{len(classes) - 1})")
        for index in picked:
            if index >= len(classes):
                raise ValueError(f"--train-classes: class index {index} is out of range; this data set has classes 0-{len(classes) - 1}")
            if index in chosen:
                raise ValueError(f"--train-classes: class {index} ({classes[index]}) is named twice")
            chosen.append(index)
    if len(chosen) < 2:
        raise ValueError("--train-classes must name at least 2 classes (the losses compare classes)")
    if len(chosen) == len(classes):
        raise ValueError("--train-classes names every class, which leaves no unseen class to retrieve; drop it to train on all")
    return sorted(chosen)


def relabel(data: ImageData, kept: list[int]) -> ImageData:
    """The samples of the classes `kept`, labelled 0..len(kept)-1 in that order."""
    new_label = torch.full((int(data.labels.max()) + 1,), -1, dtype=torch.int64)
    new_label[kept] = torch.arange(len(kept))
    mask = new_label[data.labels] >= 0
    return ImageData(data.images[mask], new_label[data.labels[mask]])


def open_set_split(data: Dataset, seen: list[int]) -> tuple[Dataset, ImageData]:
    """Musgrave et al.'s open-set protocol: a data set of the `seen` classes only (train and test,
    relabelled 0..k-1), and the test images of the other classes, for retrieval of classes never
    trained on (labelled 0..u-1 in their order)."""
    unseen = [k for k in range(len(data.classes)) if k not in seen]
    closed = Dataset(
        data.name, relabel(data.train, seen), relabel(data.test, seen), [data.classes[k] for k in seen], data.augmentations, data.source
    )
    return closed, relabel(data.test, unseen)


def canonical_name(name: str) -> str:
    """Data set name as used in run names ('cifar-10' -> 'cifar10')."""
    name = name.lower()
    return ALIASES.get(name, name)


def load_dataset(name: str, data_dir: str | Path = "data", download: bool = True) -> Dataset:
    """Load a data set by CLI name into uint8 tensors.

    Looks, in order, for an image-folder tree (`data_dir` itself or a known sub-folder holding
    train/ and test/), torchvision's own files (MNIST/raw, FashionMNIST/raw, cifar-10-batches-py),
    and finally downloads with torchvision when `download` is set.
    """
    name = canonical_name(name)
    data_dir = Path(data_dir)
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "digits":
        return load_digits()
    if name == "folder":
        if not is_tree(data_dir):
            raise DataError(f"--dataset folder needs {data_dir}/train/<class>/* and {data_dir}/test/<class>/*; neither is there")
        return load_tree("folder", data_dir, AUGMENTATIONS["folder"], None)
    names = {"mnist": DIGIT_CLASSES, "fashion-mnist": FASHION_CLASSES, "cifar10": CIFAR10_CLASSES}[name]
    tree = next((f for f in (data_dir, *(data_dir / sub for sub in TREE_FOLDERS[name])) if is_tree(f)), None)
    if tree is not None:
        data = load_tree(name, tree, AUGMENTATIONS[name], names)
        if name == "cifar10" and (data_dir / "cifar-10-batches-py").is_dir():
            data.source += f" (the binary {data_dir / 'cifar-10-batches-py'} is also there, not used: move the tree away to use it)"
    elif name in IDX_FOLDERS:
        data = load_idx_dataset(name, data_dir, names, download)
    else:
        data = load_cifar10_batches(data_dir, download)
    check_known_shape(data)
    return data


def check_known_shape(data: Dataset) -> None:
    """MNIST and Fashion-MNIST are 28x28 grey images of 10 classes: data of another shape is another data set."""
    if data.name not in KNOWN_SHAPES:
        return
    shape, num_classes = KNOWN_SHAPES[data.name]
    found = tuple(data.train.images.shape[1:])
    if found != shape or len(data.classes) != num_classes:
        channels = {1: "grey", 3: "colour"}.get(found[0], f"{found[0]}-channel")
        raise DataError(
            f"{data.source}: --dataset {data.name} is 28x28 grey images of {num_classes} classes, this data is {found[2]}x{found[1]} "
            f"{channels} of {len(data.classes)} classes; use --dataset folder for other data"
        )


def is_tree(folder: Path) -> bool:
    return (folder / "train").is_dir() and (folder / "test").is_dir()


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download), resized to 16x16.

    Fixed split: every fifth image (index % 5 == 0) is a test image, 360 test and 1,437 train.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    pixels = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0
    pixels = F.interpolate(pixels, size=(DIGITS_SIDE, DIGITS_SIDE), mode="bilinear", align_corners=False)
    images = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    is_test = torch.arange(len(labels)) % 5 == 0
    return Dataset(
        "digits",
        ImageData(images[~is_test], labels[~is_test]),
        ImageData(images[is_test], labels[is_test]),
        DIGIT_CLASSES,
        AUGMENTATIONS["digits"],
        "scikit-learn load_digits (bundled)",
    )


def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file of unsigned bytes (MNIST's format), checking its header and length."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as exc:  # BadGzipFile is an OSError; a cut .gz ends in EOFError
        raise DataError(f"{path}: cannot be read ({exc}); replace it with the original file") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (bad magic number); replace it with the original file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: truncated IDX header; replace it with the original file")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(dims)
    if expected == 0:
        raise DataError(f"{path}: an IDX file of no items (its header's sizes are {dims}); replace it with the original file")
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: truncated or corrupt IDX file: its header promises {expected} bytes of data, "
            f"it holds {len(raw) - header}; replace it with the original file"
        )
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).view(*dims)


def find_idx(raw_dir: Path, stem: str) -> Path | None:
    for candidate in (raw_dir / stem, raw_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_idx_dataset(name: str, data_dir: Path, classes: list[str], download: bool) -> Dataset:
    """MNIST or Fashion-MNIST from torchvision's layout: <data_dir>/<MNIST|FashionMNIST>/raw/*-idx?-ubyte."""
    raw_dir = data_dir / IDX_FOLDERS[name] / "raw"
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    if any(find_idx(raw_dir, s) is None for s in stems):
        torchvision_download(name, data_dir, download)
    paths = [find_idx(raw_dir, s) for s in stems]
    tensors = [read_idx(path) for path in paths]
    for path, tensor, rank in zip(paths, tensors, (3, 1, 3, 1)):
        if tensor.ndim != rank:
            kind = "images (N x rows x columns)" if rank == 3 else "labels (N)"
            raise DataError(
                f"{path}: an IDX file of rank {tensor.ndim} {tuple(tensor.shape)}, where {kind} of rank {rank} belong; replace it with the original file"
            )
    splits = []
    for images, labels, stem in ((tensors[0], tensors[1], stems[0]), (tensors[2], tensors[3], stems[2])):
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{raw_dir / stem}: {images.shape[0]} images but {labels.shape[0]} labels; replace the files with the originals"
            )
        if int(labels.max()) >= len(classes):
            raise DataError(f"{raw_dir}: a label is {int(labels.max())}, expected 0-{len(classes) - 1}")
        splits.append(ImageData(images[:, None].contiguous(), labels.long()))
    return Dataset(name, splits[0], splits[1], classes, AUGMENTATIONS[name], f"IDX files in {raw_dir}", [str(p) for p in paths])


def torchvision_download(name: str, data_dir: Path, download: bool) -> None:
    """Fetch a data set with torchvision into data_dir; any failure becomes one DataError line."""
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[name]
    hint = f"put {name} under {data_dir} (torchvision's layout or a train/ test/ image-folder tree) or point --data-dir at a folder that has it"
    if not download:
        raise DataError(f"{name} not found under {data_dir}; {hint}")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        cls(root=str(data_dir), train=True, download=True)
        cls(root=str(data_dir), train=False, download=True)
    except Exception as exc:  # network errors come in many classes; all mean the same to the user
        raise DataError(f"{name} not found under {data_dir} and the download failed ({type(exc).__name__}); {hint}") from None


def load_cifar10_batches(data_dir: Path, download: bool) -> Dataset:
    """CIFAR-10 from torchvision's python batches (<data_dir>/cifar-10-batches-py)."""
    import torchvision.datasets as tvd

    if not (data_dir / "cifar-10-batches-py").is_dir():
        torchvision_download("cifar10", data_dir, download)
    splits = []
    for train in (True, False):
        try:
            ds = tvd.CIFAR10(root=str(data_dir), train=train, download=False)
        except Exception as exc:
            raise DataError(
                f"{data_dir / 'cifar-10-batches-py'}: cannot read CIFAR-10 ({exc}); delete the folder and download again"
            ) from None
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        splits.append(ImageData(images, torch.tensor(ds.targets, dtype=torch.int64)))
    batches = data_dir / "cifar-10-batches-py"
    files = [str(batches / f"data_batch_{k}") for k in range(1, 6)] + [str(batches / "test_batch")]
    return Dataset(
        "cifar10", splits[0], splits[1], CIFAR10_CLASSES, AUGMENTATIONS["cifar10"], f"CIFAR-10 python batches in {batches}", files
    )


def list_images(split_dir: Path, classes: Sequence[str]) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for label, cls in enumerate(classes):
        folder = split_dir / cls
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")) if folder.is_dir() else []
        if not files:
            raise DataError(f"{folder}: class folder is empty or missing; every class needs images in train/ and test/")
        for path in files:
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{path}: not an image file (expected one of {', '.join(sorted(IMAGE_SUFFIXES))}); remove it")
            paths.append(path)
            labels.append(label)
    return paths, labels


def decode_images(paths: list[Path], grey: bool = False) -> torch.Tensor:
    """Decode image files with PIL into one uint8 tensor: grayscale images stay 1 channel, any
    colour mode (palette, RGBA, CMYK, ...) becomes RGB; a set mixing both is all RGB. With `grey`
    (a data set known to be grey, MNIST's) every image is converted to grey."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                    raise DataError(f"{path}: {image.mode} (16/32-bit) images are not supported; convert the data set to 8-bit")
                image = image.convert("L" if grey or image.mode in ("1", "L", "LA") else "RGB")
                array = torch.from_numpy(np.asarray(image).copy())
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            raise DataError(f"{path}: cannot be decoded as an image; replace or remove it") from None
        images.append(array[None] if array.ndim == 2 else array.permute(2, 0, 1))
    first = images[0]
    channels = max(im.shape[0] for im in images)
    for path, image in zip(paths, images):
        if image.shape[1:] != first.shape[1:]:
            raise DataError(
                f"{path}: image is {image.shape[2]}x{image.shape[1]} but {paths[0]} is {first.shape[2]}x{first.shape[1]}; "
                "all images of a data set must have one size"
            )
    return torch.stack([im.expand(channels, -1, -1) for im in images])


def load_tree(name: str, root: Path, augmentations: tuple[str, ...], classes: list[str] | None) -> Dataset:
    """An image-folder tree <root>/train/<class>/*, <root>/test/<class>/*; classes from folder names."""
    train_classes, test_classes = (class_folders(root / split) for split in ("train", "test"))
    if len(train_classes) < 2:
        found = f"only the class {train_classes[0]!r}" if train_classes else "no class folders"
        raise DataError(f"{root / 'train'}: {found}; a classifier needs at least two, as {root}/train/<class>/<image files>")
    unknown = sorted(set(test_classes) - set(train_classes))
    if unknown:
        raise DataError(
            f"{root / 'test'}: the classes {', '.join(unknown)} have no folder in {root / 'train'}, so nothing could learn them; "
            "add their train images or move them out of test/"
        )
    splits, suffixes = [], set()
    for split in ("train", "test"):
        paths, labels = list_images(root / split, train_classes)
        suffixes |= {p.suffix.lower() for p in paths}
        splits.append(ImageData(decode_images(paths, grey=name in KNOWN_SHAPES), torch.tensor(labels, dtype=torch.int64)))
    channels = max(s.images.shape[1] for s in splits)  # grey train and colour test images make a colour set, as within a split
    train, test = (ImageData(s.images.expand(-1, channels, -1, -1).contiguous(), s.labels) for s in splits)
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DataError(f"{root}: train images are {tuple(train.images.shape[1:])} but test images {tuple(test.images.shape[1:])}")
    if classes is None or [c.lower() for c in train_classes] != [c.lower() for c in classes]:
        classes = train_classes
    files = [str(root / "train"), str(root / "test")]
    return Dataset(name, train, test, classes, augmentations, f"image folders in {root} ({', '.join(sorted(suffixes))})", files)


def class_folders(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def flip(x: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
    """Mirror the images whose entry of the boolean `flipped` (N) is set (torchvision's hflip)."""
    return torch.where(flipped[:, None, None, None], x.flip(-1), x)


def rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image counter-clockwise by its angle in `degrees` (N) about the image centre,
    bilinear interpolation, zero fill: torchvision's rotate(img, angle, InterpolationMode.BILINEAR)."""
    angle = torch.deg2rad(degrees.to(x.dtype))
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    # affine_grid maps output to input coordinates (x right, y down): the inverse of a
    # counter-clockwise turn on screen is [[cos, -sin], [sin, cos]] in these coordinates.
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def crop(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Window of each image's CROP_PADDING-zero-padded copy, of the image's size, at (row, column)
    offsets (2 x N, each in [0, 2 * CROP_PADDING]): torchvision's RandomCrop(size, padding) for given draws."""
    n, (h, w) = x.shape[0], x.shape[-2:]
    padded = F.pad(x, (CROP_PADDING,) * 4)
    rows = (offsets[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (offsets[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def augment_batch(x: torch.Tensor, augmentations: Sequence[str], generator: torch.Generator) -> torch.Tensor:
    """Apply the study's random augmentations to a whole float batch (N x C x H x W) on its device.

    Parameters are drawn from `generator`, which lives on the batch's device, so nothing waits for
    the host or copies from it, from the same distributions as torchvision's per-sample transforms:
    RandomHorizontalFlip(0.5), RandomRotation(5, BILINEAR) (uniform angle in [-5, 5], zero fill) and
    RandomCrop(32, padding=4) (uniform offsets).
    """
    n, device = x.shape[0], generator.device
    for op in augmentations:
        if op == "flip":
            x = flip(x, torch.rand(n, generator=generator, device=device) < 0.5)
        elif op == "rotate":
            x = rotate(x, (torch.rand(n, generator=generator, device=device) * 2 - 1) * ROTATION_DEGREES)
        elif op == "crop":
            x = crop(x, torch.randint(0, 2 * CROP_PADDING + 1, (2, n), generator=generator, device=device))
        else:
            raise ValueError(f"unknown augmentation {op!r}")
    return x


def tensor_batches(
    data: ImageData,
    order: torch.Tensor,
    batch_size: int,
    augmentations: Sequence[str],
    generator: torch.Generator,
    start: int = 0,
    rank: int = 0,
    world: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fast path: the full batches of `data` (already on the training device) in `order`, augmented
    there; the last partial batch is dropped, as the study's loader does (drop_last=True).

    With `world` processes each global batch is augmented whole (the same random draws as one
    process) and this rank gets its `rank`-th of `world` equal slices (see shard_order)."""
    order = order.to(data.images.device)
    share = batch_size // world
    for i in range(start * batch_size, len(order) - batch_size + 1, batch_size):
        idx = order[i : i + batch_size]
        x = augment_batch(data.images[idx].float().div_(255), augmentations, generator)
        rows = slice(rank * share, (rank + 1) * share)
        yield x[rows], data.labels[idx[rows]]


def full_batches(num_samples: int, batch_size: int) -> int:
    """Training steps per epoch: the last partial batch is dropped (the study's drop_last=True)."""
    return num_samples // batch_size


def shard_order(order: torch.Tensor, batch_size: int, rank: int, world: int) -> torch.Tensor:
    """This rank's indices: the rank-th of `world` equal slices of every full global batch of `order`
    (--batch-size is a multiple of `world`; the last partial batch is dropped)."""
    share = batch_size // world
    batches = order[: full_batches(len(order), batch_size) * batch_size].view(-1, batch_size)
    return batches[:, rank * share : (rank + 1) * share].reshape(-1)


class TransformedImages(torch.utils.data.Dataset):
    """Per-sample view of uint8 tensors through torchvision PIL transforms (the study's pipeline)."""

    def __init__(self, data: ImageData, augmentations: Sequence[str]) -> None:
        import torchvision.transforms as T

        self.data = data
        ops = {
            "flip": T.RandomHorizontalFlip(),
            "rotate": T.RandomRotation(ROTATION_DEGREES, interpolation=T.InterpolationMode.BILINEAR),
            "crop": T.RandomCrop(data.images.shape[-1], padding=CROP_PADDING),
        }
        self.transform = T.Compose([*(ops[a] for a in augmentations), T.ToTensor()])

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        image = self.data.images[i]
        array = image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()
        return self.transform(Image.fromarray(array)), int(self.data.labels[i])


def loader_batches(
    data: ImageData,
    order: torch.Tensor,
    batch_size: int,
    augmentations: Sequence[str],
    generator: torch.Generator,
    workers: int,
    device: torch.device,
    start: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Loader path: a DataLoader over per-sample transforms, sampling `order` (CPU data); the last
    partial batch is dropped, as in the study."""
    loader = torch.utils.data.DataLoader(
        TransformedImages(data, augmentations),
        batch_size=batch_size,
        sampler=order[start * batch_size :].tolist(),
        num_workers=workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
        generator=generator,
        persistent_workers=False,
    )
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)
