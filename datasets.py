"""Data sets as uint8 tensors (N x C x H x W images, N int64 labels) read through torchvision or from
image folders, checked against what their names claim; batches.py makes the training batches."""

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Generator, Tensor
from torch.utils.data import random_split

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "folder")
ALIASES = {"cifar-10": "cifar10", "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist"}
AUGMENTATIONS = {"digits": ("rotate",), "mnist": ("rotate",), "fashion-mnist": ("flip", "rotate")}
AUGMENTATIONS["cifar10"] = ("flip", "crop")
# the bundled 8x8 digits, upsampled: 16x16 keeps every stroke at a third of 28x28's cost
DIGITS_SIDE = 16
FASHION_CLASSES = "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot"
FASHION_CLASSES = FASHION_CLASSES.split(",")
CIFAR10_CLASSES = "airplane automobile bird cat deer dog frog horse ship truck".split()
DIGIT_CLASSES = [str(d) for d in range(10)]
CLASSES = {"mnist": DIGIT_CLASSES, "fashion-mnist": FASHION_CLASSES, "cifar10": CIFAR10_CLASSES}
# where in --data-dir to look for a train/ test/ tree
TREE_FOLDERS = {
    "mnist": ("mnist", "MNIST-jpg", "mnist-jpg"),
    "fashion-mnist": ("fashion-mnist", "FashionMNIST-jpg", "fashion-mnist-jpg"),
    "cifar10": ("cifar10", "cifar10-jpg", "cifar-10", "CIFAR10"),
}
# torchvision.datasets classes and folders
TORCHVISION = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}
GREY_SETS = ("mnist", "fashion-mnist")
# a name is a claim: 10 classes of images of this shape, else --dataset folder
SHAPES = {"mnist": "28x28 grey", "fashion-mnist": "28x28 grey", "cifar10": "32x32 colour"}
IDX_FILES = [f"{s}-{k}-ubyte" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
CIFAR10_FILES = [*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]
# what torchvision's IDX reader raises
IDX_ERRORS = (OSError, AssertionError, KeyError, IndexError, RuntimeError, TypeError, ValueError)


class DataError(Exception):
    """A data problem to report as one line (what is wrong, which file, what to do); exit code 1."""


@dataclass
class ImageData:
    images: Tensor  # N x C x H x W, uint8
    labels: Tensor  # N, int64

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device | str) -> "ImageData":
        return ImageData(self.images.to(device), self.labels.to(device))


@dataclass
class Dataset:
    name: str
    train: ImageData
    test: ImageData
    classes: list[str]
    augmentations: tuple[str, ...]
    source: str  # what was read, in words: the format and the folder (start-up line, summary.json)
    # the files or folders read (summary.json's data_files)
    files: list[str] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:  # images are square (load_tree refuses others)
        return self.train.images.shape[-1]


def channel_stats(images: Tensor) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and std of uint8 images on the [0, 1] scale, from each channel's 256-bin
    histogram (no float copy of the data set); a constant channel gets std 1, so standardising stays finite."""
    levels = torch.arange(256, dtype=torch.float64) / 255
    channels = images.transpose(0, 1).reshape(images.shape[1], -1).cpu()
    p = torch.stack([torch.bincount(pixels, minlength=256) for pixels in channels]).double()
    p /= p.sum(1, keepdim=True)
    mean = p @ levels
    std = (p * (levels - mean[:, None]) ** 2).sum(1).sqrt()
    return mean.tolist(), torch.where(std > 0, std, 1.0).tolist()


def fingerprint(train: ImageData, test: ImageData) -> str:
    """What a run reads, cheaply: each split's count and image shape, and a SHA-256 of its labels and of every
    (N // 64)-th image's pixels (a resume on other data is refused: checkpoints.load_checkpoint)."""
    digest = hashlib.sha256()
    for split in (train, test):
        for part in (split.labels, split.images[:: max(1, len(split) // 64)]):
            digest.update(part.cpu().contiguous().numpy().tobytes())
    shape = "x".join(map(str, train.images.shape[1:]))
    return f"{len(train)} train and {len(test)} test images of {shape}, sha256 {digest.hexdigest()[:16]}"


def split_validation(data: ImageData, fraction: float, seed: int) -> tuple[ImageData, ImageData]:
    """(train, validation): max(1, round(fraction * N)) held out by a seeded random_split; both keep the data's order."""
    held = max(1, round(fraction * len(data)))
    generator = Generator().manual_seed(seed + 7919)
    parts = random_split(range(len(data)), [len(data) - held, held], generator=generator)
    indices = (sorted(p.indices) for p in parts)
    return tuple(ImageData(data.images[k], data.labels[k]) for k in indices)


def parse_class_list(spec: str, classes: Sequence[str]) -> list[int]:
    """The sorted class indices `spec` names: indices (`0,2,5`), inclusive ranges (`0-4`) or class names (`Trouser,Bag`, any case),
    mixed. ValueError in words for an empty entry, an unknown name or index, a reversed range, a repeat, < 2 classes or all of them."""
    lowered, flag = {c.lower(): i for i, c in enumerate(classes)}, "--train-classes"
    top, chosen = len(classes) - 1, []
    for token in (t.strip() for t in spec.split(",")):
        if bounds := re.fullmatch(r"(\d+)(?:-(\d+))?", token):  # an index or a range
            first, last = int(bounds[1]), int(bounds[2] or bounds[1])
            if first > last:
                raise ValueError(f"{flag}: the range {token} is reversed; write {last}-{first}")
            if last > top:
                raise ValueError(f"{flag}: class index {last} is out of range 0-{top}")
            picked = range(first, last + 1)
        elif token.lower() in lowered:
            picked = [lowered[token.lower()]]
        else:  # an empty entry or an unknown name
            what = f"no class {token!r}" if token else f"{spec!r} has an empty entry"
            raise ValueError(f"{flag}: {what}; the classes are 0-{top}: {', '.join(classes)}")
        for index in picked:
            if index in chosen:
                raise ValueError(f"{flag}: class {index} ({classes[index]}) is named twice")
            chosen.append(index)
    if len(chosen) < 2:
        raise ValueError(f"{flag} must name at least 2 classes (the losses compare classes)")
    if len(chosen) == len(classes):
        raise ValueError(f"{flag} names every class, leaving none unseen; drop it to train on all")
    return sorted(chosen)


def relabel(data: ImageData, kept: list[int]) -> ImageData:
    """The samples of the classes `kept` (sorted), labelled 0..len(kept)-1 in that order."""
    mask = torch.isin(data.labels, classes := torch.tensor(kept, device=data.labels.device))
    return ImageData(data.images[mask], torch.searchsorted(classes, data.labels[mask]))


def open_set_split(data: Dataset, seen: list[int]) -> tuple[Dataset, ImageData]:
    """Musgrave et al.'s open-set protocol: the data set of the `seen` classes (relabelled 0..k-1), and
    the test images of the other classes (relabelled 0..u-1), for retrieval of classes never trained on."""
    train, test = relabel(data.train, seen), relabel(data.test, seen)
    closed = replace(data, train=train, test=test, classes=[data.classes[k] for k in seen])
    return closed, relabel(data.test, [k for k in range(len(data.classes)) if k not in seen])


def canonical_name(name: str) -> str:
    """Data set name as used in run names ('cifar-10' -> 'cifar10')."""
    return ALIASES.get(name.lower(), name.lower())


def load_dataset(name: str, data_dir: str | Path = "data", download: bool = True) -> Dataset:
    """A data set by CLI name, from the first of: an image-folder tree (`data_dir` or a known sub-folder with train/ and test/),
    torchvision's files, a torchvision download if `download`. DataError for data that cannot train (another shape, one image)."""
    name, data_dir = canonical_name(name), Path(data_dir)
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "digits":
        return load_digits()
    trees = [data_dir, *(data_dir / sub for sub in TREE_FOLDERS.get(name, ()))]
    tree = next((f for f in trees if (f / "train").is_dir() and (f / "test").is_dir()), None)
    if tree is None and name == "folder":
        raise DataError(f"--dataset folder needs {data_dir}/train/<class>/* and test/<class>/*")
    data = load_tree(name, tree) if tree is not None else load_torchvision(name, data_dir, download)
    if tree is not None and name == "cifar10" and (data_dir / "cifar-10-batches-py").is_dir():
        data.source += f" (the binary {data_dir / 'cifar-10-batches-py'} is also there, not used: move the tree away to use it)"
    images = data.train.images
    c, h, w = images.shape[1:]
    found = f"{w}x{h} " + {1: "grey", 3: "colour"}.get(c, f"{c}-channel")
    if name in SHAPES and (found, len(data.classes)) != (SHAPES[name], 10):
        raise DataError(
            f"{data.source}: --dataset {name} is {SHAPES[name]} images of 10 classes, this data is {found} of {len(data.classes)} classes; use --dataset folder for it"
        )
    # nothing in the pixels tells the classes apart: a run would learn nothing
    if torch.equal(images, images[:1].expand_as(images)):
        raise DataError(f"{data.source}: all {len(images)} train images are alike; use real data")
    return data


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits (no download) resized to 16x16; every fifth image (index % 5 == 0) is a test image."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    pixels = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0
    pixels = F.interpolate(pixels, size=(DIGITS_SIDE,) * 2, mode="bilinear")
    images, labels = (pixels.clamp(0, 1) * 255).round().to(torch.uint8), torch.tensor(bunch.target)
    test = torch.arange(len(labels)) % 5 == 0
    train, test = (ImageData(images[k], labels[k]) for k in (~test, test))
    source = "scikit-learn load_digits (bundled)"
    return Dataset("digits", train, test, DIGIT_CLASSES, AUGMENTATIONS["digits"], source)


def load_torchvision(name: str, data_dir: Path, download: bool) -> Dataset:
    """MNIST or Fashion-MNIST (<data_dir>/<MNIST|FashionMNIST>/raw/*-ubyte, decompressed) or CIFAR-10 (<data_dir>/cifar-10-batches-py)
    in torchvision's layout, read by torchvision, downloaded by it when missing and `download` is set; damaged files are one line."""
    import torchvision.datasets as tvd  # here, not at the top: importing torchvision takes seconds (its compiler imports), paid only when used

    folder = data_dir / ("cifar-10-batches-py" if name == "cifar10" else f"{TORCHVISION[name]}/raw")
    paths = [folder / file for file in (CIFAR10_FILES if name == "cifar10" else IDX_FILES)]
    if not all(path.is_file() for path in paths):
        hint = f"put {name} under {data_dir} (torchvision's layout or a train/ test/ image-folder tree) or point --data-dir at a folder with it"
        problem = f"{name} not found under {data_dir}"
        if not download:
            raise DataError(f"{problem}; {hint}")
        try:
            for train in (True, False):
                getattr(tvd, TORCHVISION[name])(str(data_dir), train=train, download=True)
        # network and disk errors come in many classes; all mean the same to the user
        except Exception as exc:
            raise DataError(f"{problem}, download failed ({type(exc).__name__}); {hint}") from None
    if name != "cifar10":
        splits, source = read_idx(paths), f"IDX files in {folder}"
    else:
        try:
            sets = [tvd.CIFAR10(str(data_dir), train=train) for train in (True, False)]
        # a RuntimeError for a failed MD5 check, pickle's errors for a damaged batch
        except Exception as exc:
            raise DataError(f"{folder}: damaged ({exc}); delete it to download again") from None
        images = [torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous() for s in sets]
        splits = [ImageData(x, torch.tensor(s.targets)) for x, s in zip(images, sets)]
        source = f"CIFAR-10 python batches in {folder}"
    return Dataset(name, *splits, CLASSES[name], AUGMENTATIONS[name], source, list(map(str, paths)))


def read_idx(paths: list[Path]) -> list[ImageData]:
    """Train and test from the four IDX files, with torchvision's own readers, one file at a time."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    tensors = []
    for path, reader in zip(paths, (read_image_file, read_label_file) * 2):
        try:
            # 0x0803 (unsigned bytes, 3 sizes), the sizes: torchvision fails on a size 0
            magic, *sizes = np.fromfile(path, ">u4", count=4).tolist() or [0]
            if magic >> 8 == 8 and 0 in (sizes := tuple(sizes[: magic % 256])):
                raise DataError(f"{path}: an IDX file of no items (sizes {sizes}); replace it")
            tensors.append(reader(str(path)))
        except IDX_ERRORS as exc:
            reason = str(exc) or type(exc).__name__  # torchvision's asserts have no message
            raise DataError(f"{path}: damaged IDX file ({reason}); replace it") from None
    for images, labels, path in ((*tensors[:2], paths[1]), (*tensors[2:], paths[3])):
        count = f"{len(labels)} labels for {len(images)} images"
        found = count if len(images) != len(labels) else f"a label {int(labels.max())}"
        if len(images) != len(labels) or labels.max() >= 10:
            raise DataError(f"{path}: {found}, expected one label 0-9 per image; replace the files")
    return [ImageData(tensors[i][:, None].contiguous(), tensors[i + 1]) for i in (0, 2)]


def listed(folder: Path) -> list[tuple[str, bool]]:
    """(name, is a folder) of the entries of `folder` but hidden ones (.DS_Store, .ipynb_checkpoints); one line if one cannot be read."""
    try:
        with os.scandir(folder) as entries:
            return sorted((e.name, e.is_dir()) for e in entries if not e.name.startswith("."))
    except OSError as exc:  # PermissionError, a symlink loop (ELOOP) as the folder or an entry, ...
        raise DataError(
            f"{exc.filename or folder}: cannot be listed ({exc.strerror}); make it a readable folder"
        ) from None


def decode(path: str, grey: bool) -> Tensor:
    """An image file as uint8 C x H x W, with PIL: grey modes stay one channel, others (palette, RGBA, CMYK) become RGB; all grey with `grey`."""
    try:
        with Image.open(path) as image:
            if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                raise DataError(
                    f"{path}: {image.mode} (16/32-bit) images are unsupported; use 8-bit"
                )
            grey = grey or image.mode in ("1", "L", "LA")
            array = torch.from_numpy(np.array(image.convert("L" if grey else "RGB")))
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: {exc} Use smaller images") from None
    except (OSError, ValueError, SyntaxError):  # UnidentifiedImageError is an OSError
        raise DataError(f"{path}: cannot be decoded as an image; replace or remove it") from None
    return array[None] if array.ndim == 2 else array.permute(2, 0, 1)


def load_tree(name: str, root: Path) -> Dataset:
    """An image-folder tree <root>/train/<class>/*, <root>/test/<class>/*: the classes are train/'s folders, every image is square
    and of one size; one colour image makes the set colour (grey images repeated), mnist and fashion-mnist are read grey."""
    from torchvision.datasets import DatasetFolder  # imported when used, as in load_torchvision

    entries = {split: listed(root / split) for split in ("train", "test")}
    if strays := [
        root / s / n for s, found in entries.items() for n, is_dir in found if not is_dir
    ]:
        raise DataError(f"{strays[0]}: a file where only class folders belong; move or remove it")
    classes, test_classes = ([n for n, _ in entries[split]] for split in ("train", "test"))
    if len(classes) < 2:
        found = f"only the class {classes[0]!r}" if classes else "no class folders"
        raise DataError(f"{root / 'train'}: {found}; a classifier needs at least two")
    if unknown := sorted(set(test_classes) - set(classes)):
        raise DataError(f"{root / 'test'}: the classes {', '.join(unknown)} are not in train/")
    real_dirs: dict[str, str] = {}

    @cache  # once a folder: realpath costs milliseconds, times 60,000 files
    def shown(folder: str) -> bool:
        """Not hidden, and not reached before through a link (its images would be read twice)."""
        if (first := real_dirs.setdefault(os.path.realpath(folder), folder)) != folder:
            raise DataError(f"{folder}: the same folder as {first}, via a link; remove the link")
        return not any(part.startswith(".") for part in Path(folder).relative_to(root).parts)

    def valid(path: str) -> bool:
        """DatasetFolder's filter: regular files only (PIL would wait on a FIFO forever), not hidden."""
        hidden = os.path.basename(path).startswith(".")
        return shown(os.path.dirname(path)) and not hidden and os.path.isfile(path)

    samples, index = [], {c: i for i, c in enumerate(classes)}
    for split in (root / "train", root / "test"):
        for folder in (split / c for c in classes if (split / c).is_dir()):
            listed(folder)  # the walk skips a folder it cannot list, which would then look empty
        found = DatasetFolder.make_dataset(str(split), index, is_valid_file=valid, allow_empty=True)
        if empty := sorted(set(classes) - {classes[label] for _, label in found}):
            raise DataError(f"{split / empty[0]}: class folder is empty or missing; add its images")
        samples.append(found)
    paths, labels = zip(*samples[0], *samples[1])
    images = []
    for path in paths:
        images.append(image := decode(path, grey=name in GREY_SETS))
        (h, w), (h0, w0) = image.shape[1:], images[0].shape[1:]
        if h != w or (h, w) != (h0, w0):
            other = "not square" if h != w else f"{paths[0]} is {w0}x{h0}"
            raise DataError(f"{path}: the image is {w}x{h}, {other}; resize all to one square size")
    channels = max(image.shape[0] for image in images)  # one colour image makes a colour set
    images = torch.stack([image.expand(channels, -1, -1) for image in images])
    n, labels = len(samples[0]), torch.tensor(labels)
    train, test = ImageData(images[:n], labels[:n]), ImageData(images[n:], labels[n:])
    if name in CLASSES and [c.lower() for c in classes] == [c.lower() for c in CLASSES[name]]:
        classes = CLASSES[name]
    suffixes = sorted({Path(path).suffix.lower() for path in paths})
    source = f"image folders in {root} ({', '.join(suffixes)})"
    files = [str(root / "train"), str(root / "test")]
    return Dataset(name, train, test, classes, AUGMENTATIONS.get(name, ()), source, files)
