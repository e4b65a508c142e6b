"""datasets.py: IDX files, torchvision's MNIST layout, image-folder trees, digits, errors."""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    MNIST_TEST,
    MNIST_TRAIN,
    TREE_CLASSES,
    idx_bytes,
    stderr_error_line,
    write_idx,
    write_image_tree,
)
from PIL import Image

import main
from datasets import (
    CIFAR10_CLASSES,
    DIGIT_CLASSES,
    DataError,
    canonical_name,
    channel_stats,
    load_dataset,
)


def zeros(*shape: int) -> bytes:
    return idx_bytes(np.zeros(shape, np.uint8))


GOOD = zeros(100, 28, 28)
DAMAGED = "{path}: damaged IDX file...replace it"
IDX_CASES = [
    ("t10k-images-idx3-ubyte", GOOD[:1000], DAMAGED),
    ("t10k-images-idx3-ubyte", GOOD + b"\0", DAMAGED),
    ("train-labels-idx1-ubyte", bytes([0, 0, 8, 3, 0, 0, 0, 4]), DAMAGED),  # 3 sizes, holds 1
    ("train-images-idx3-ubyte", b"\x00\x00\x0d\x03" + bytes(20), DAMAGED),  # float data
    ("train-images-idx3-ubyte", b"PK\x03\x04" + bytes(20), DAMAGED),  # a zip file
    ("t10k-labels-idx1-ubyte", b"\x00\x00", DAMAGED),
    ("t10k-labels-idx1-ubyte", b"", DAMAGED),
    ("t10k-labels-idx1-ubyte", zeros(100, 1, 1), DAMAGED),  # labels of rank 3
    ("train-images-idx3-ubyte", zeros(200, 784), DAMAGED),  # images of rank 2
    ("train-images-idx3-ubyte", zeros(0, 28, 28), "{path}: an IDX file of no items"),
    ("t10k-images-idx3-ubyte", zeros(100, 0, 28), "{path}: an IDX file of no items"),
    ("train-labels-idx1-ubyte", zeros(197), "{path}: 197 labels for 200 images"),
    ("t10k-labels-idx1-ubyte", idx_bytes(np.full(100, 12)), "{path}: a label 12, expected"),
    (
        "train-images-idx3-ubyte",
        zeros(200, 32, 32),
        "IDX files in {raw}: --dataset mnist is 28x28 ",
    ),
    ("train-images-idx3-ubyte", zeros(200, 28, 28), "IDX files in {raw}: all 200 train images are"),
]


@pytest.mark.parametrize(("stem", "data", "want"), IDX_CASES)
def test_bad_idx_file_is_one_line_naming_it(tiny_mnist, stem, data, want):
    """Whatever torchvision's IDX reader raises (asserts, ValueError, RuntimeError, TypeError), too
    few labels, a label past 9, images of another size or all alike: one DataError line."""
    raw = tiny_mnist[0] / "MNIST" / "raw"
    (raw / stem).write_bytes(data)
    with pytest.raises(DataError) as info:
        load_dataset("mnist", tiny_mnist[0], download=False)
    head, _, tail = want.format(path=raw / stem, raw=raw).partition("...")
    message = str(info.value)
    assert message.startswith(head) and message.endswith(tail) and "\n" not in message


def test_load_mnist_from_idx_tree(tiny_mnist):
    """Arrays as written, in uint8 / int64; the source line and files name what was read."""
    root, arrays = tiny_mnist
    ds = load_dataset("mnist", root, download=False)
    assert (ds.name, ds.classes, ds.channels, ds.image_size) == ("mnist", DIGIT_CLASSES, 1, 28)
    assert ds.augmentations == ("rotate",)
    for split, key, n in ((ds.train, "train", MNIST_TRAIN), (ds.test, "t10k", MNIST_TEST)):
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        assert split.images.shape == (n, 1, 28, 28) and split.labels.shape == (n,) == (len(split),)
        assert np.array_equal(split.images[:, 0].numpy(), arrays[f"{key}_images"])
        assert np.array_equal(split.labels.numpy(), arrays[f"{key}_labels"].astype(np.int64))
    assert torch.equal(ds.train.to("cpu").images, ds.train.images)
    raw = root / "MNIST" / "raw"
    assert ds.source == f"IDX files in {raw}"
    names = [f"{s}-{k}-ubyte" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
    assert ds.files == [str(raw / name) for name in names]


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_missing_data_without_download(tmp_path, name):
    with pytest.raises(DataError, match=f"^{name} not found under {tmp_path}; "):
        load_dataset(name, tmp_path, download=False)


def test_fashion_mnist_idx_and_alias(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    for split, n in (("train", 20), ("t10k", 10)):
        images = np.random.default_rng(1).integers(0, 256, (n, 28, 28))
        write_idx(raw / f"{split}-images-idx3-ubyte", images.astype(np.uint8))
        write_idx(raw / f"{split}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    ds = load_dataset("fashion_mnist", tmp_path, download=False)
    assert ds.name == "fashion-mnist" and len(ds.train) == 20 and len(ds.test) == 10
    assert ds.classes[0] == "T-shirt/top" and ds.augmentations == ("flip", "rotate")


def test_gray_tree_and_what_it_skips(gray_tree):
    """Classes in folder order, pixels as written; hidden files and folders and a FIFO (PIL would
    wait on it forever) are skipped, a class folder's sub-folders are read (DatasetFolder's walk)."""
    ds = load_dataset("folder", gray_tree)
    assert ds.classes == list(TREE_CLASSES) and ds.augmentations == ()
    assert ds.train.images.shape == (12, 1, 28, 28) and ds.test.images.shape == (6, 1, 28, 28)
    assert ds.train.images.dtype == torch.uint8 and ds.train.labels.dtype == torch.int64
    assert ds.train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    first = np.array(Image.open(gray_tree / "train" / "bee" / "001.png"))
    assert np.array_equal(ds.train.images[5, 0].numpy(), first)
    train = gray_tree / "train"
    (train / "cat" / ".DS_Store").write_bytes(b"\0\1")
    shutil.copytree(train / "bee", train / "bee" / "more")
    shutil.copytree(train / "ant", train / "ant" / ".ipynb_checkpoints")
    os.mkfifo(train / "ant" / "pipe.png")
    assert load_dataset("folder", gray_tree).train.labels.tolist() == [0] * 4 + [1] * 8 + [2] * 4


def test_rgb_tree(rgb_tree):
    ds = load_dataset("folder", rgb_tree)
    assert ds.channels == 3 and ds.image_size == 32 and ds.train.images.shape == (12, 3, 32, 32)
    pixels = np.array(Image.open(rgb_tree / "test" / "cat" / "001.png").convert("RGB"))
    assert np.array_equal(ds.test.images[5].permute(1, 2, 0).numpy(), pixels)


def write_two_class_tree(root: Path, make_image, suffix: str = ".png") -> Path:
    for split in ("train", "test"):
        for k, cls in enumerate(("a", "b")):
            (root / split / cls).mkdir(parents=True)
            make_image(k).save(root / split / cls / f"0{suffix}")
    return root


@pytest.mark.parametrize(
    ("mode", "size", "colours", "suffix", "want"),
    [
        ("RGBA", 28, [(0, 20, 30, 255), (10, 20, 30, 255)], ".png", [[0, 20, 30], [10, 20, 30]]),
        ("P", 28, [(200, 0, 0), (200, 0, 50)], ".png", [[200, 0, 0], [200, 0, 50]]),
        ("CMYK", 28, [(0, 0, 0, 235), (0, 0, 0, 215)], ".jpg", [[20] * 3, [40] * 3]),  # K kept
        ("L", 1, [0, 100], ".png", [[0], [100]]),  # data; main.py's model size check refuses it
        (
            "I;16",
            28,
            [1000, 2000],
            ".png",
            "{r}/train/a/0.png: I;16 (16/32-bit) images are unsupported",
        ),
        ("L", (40, 28), [0, 10], ".png", "{r}/train/a/0.png: the image is 40x28, not square; "),
        ("RGB", 32, [(9, 9, 9)] * 2, ".png", "image folders in {r} (.png): all 2 train images"),
    ],
)
def test_two_class_tree_of_one_image_mode(tmp_path, mode, size, colours, suffix, want):
    """Alpha dropped, a palette's colours, CMYK as RGB, 1x1 images load (`want`: the pixel of
    each class); 16-bit, non-square (only the width used to be compared) and all-alike trees are
    one line (`want`: its start)."""
    size = (size, size) if isinstance(size, int) else size
    root = write_two_class_tree(tmp_path / "t", lambda k: Image.new(mode, size, colours[k]), suffix)
    if isinstance(want, str):
        with pytest.raises(DataError) as info:
            load_dataset("folder", root)
        assert str(info.value).startswith(want.format(r=root))
    else:
        pixels = load_dataset("folder", root).train.images[:, :, 0, 0].int()
        tolerance = 3 if suffix == ".jpg" else 0  # JPEG is lossy
        torch.testing.assert_close(
            pixels, torch.tensor(want, dtype=torch.int), atol=tolerance, rtol=0
        )


# id | what the message starts with | changes to the grey tree (verb:path[:argument])
TREE_REFUSALS = """
other-size | {r}/train/bee/zzz.png: the image is 20x20, {r}/train/ant/000.png is 28x28 | png:train/bee/zzz.png:20x20
other-height | {r}/test/cat/zzz.png: the image is 28x20, not square | png:test/cat/zzz.png:28x20
test-other-size | {r}/test/ant/000.png: the image is 32x32, {r}/train/ant/000.png is 28x28 | png:test/ant/000.png:32x32
garbage-png | {r}/test/ant/x.png: cannot be decoded as an image | text:test/ant/x.png:not_a_png
0-byte-image | {r}/train/bee/blank.png: cannot be decoded as an image | text:train/bee/blank.png:
cut-jpeg | {r}/train/cat/a.jpg: cannot be decoded as an image | text:train/cat/a.jpg:\xff\xd8\xff\xe0_cut
not-an-image | {r}/train/cat/notes.txt: cannot be decoded as an image | text:train/cat/notes.txt:hello
bomb | {r}/train/ant/000.png: Image size (784 pixels) exceeds limit | max-pixels:
empty-class | {r}/train/dog: class folder is empty or missing; add its images | mkdir:train/dog
class-not-in-test | {r}/test/bee: class folder is empty or missing; add its images | rm:test/bee
no-test | --dataset folder needs {r}/train/<class>/* and test/<class>/* | rm:test
no-tree | --dataset folder needs {r}/train/<class>/* | rm:train rm:test
file-among-classes | {r}/train/loose.png: a file where only class folders belong | text:train/loose.png:
one-class | {r}/train: only the class 'ant'; a classifier needs at least two | rm:train/bee rm:test/bee rm:train/cat rm:test/cat
test-only-class | {r}/test: the classes dog are not in train/ | copy:test/bee:test/dog
link-loop | {r}/train/bee/again: the same folder as {r}/train/bee, via a link | link:train/bee/again:train/bee
test-is-train | {r}/test/cat: the same folder as {r}/train/cat, via a link | rm:test/cat link:test/cat:train/cat
entry-loop | {r}/train/zz: cannot be listed (Too many levels of symbolic links) | link:train/zz:train/zz
unlisted-test | {r}/test: cannot be listed (Permission denied) | deny:test
unlisted-class | {r}/train/bee: cannot be listed (Permission denied) | deny:train/bee
unlisted-test-class | {r}/test/cat: cannot be listed (Permission denied) | deny:test/cat
"""
TREE_ROWS = [row.split(" | ") for row in TREE_REFUSALS.strip().splitlines()]


@pytest.mark.parametrize(
    ("want", "changes"), [r[1:] for r in TREE_ROWS], ids=[r[0] for r in TREE_ROWS]
)
def test_bad_tree_is_one_line_naming_the_place(gray_tree, monkeypatch, want, changes):
    """Tests run as root, who may list any folder: deny makes os.scandir (os.walk's too) raise
    what a user without the right gets."""
    scandir = os.scandir

    def refuse(folder="."):
        if str(folder) in denied:
            raise PermissionError(13, "Permission denied", str(folder))
        return scandir(folder)

    denied, root = [], gray_tree
    actions = {
        "png": lambda path, size: Image.new("L", tuple(map(int, size.split("x")))).save(path),
        "text": lambda path, text: path.write_bytes(text.encode("latin-1")),
        "rm": lambda path: shutil.rmtree(path),
        "mkdir": Path.mkdir,
        "copy": lambda path, to: shutil.copytree(path, root / to),
        "link": lambda path, to: path.symlink_to(root / to),
        "deny": lambda path: denied.append(str(path)),
        # 784 pixels are over twice the limit: PIL's DecompressionBombError
        "max-pixels": lambda _: monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100),
    }
    monkeypatch.setattr(os, "scandir", refuse)
    for verb, *args in (change.split(":", 2) for change in shlex.split(changes)):
        actions[verb](root / args[0], *args[1:])
    with pytest.raises(DataError) as info:
        load_dataset("folder", gray_tree)
    message = str(info.value)
    assert message.startswith(want.format(r=gray_tree)) and "\n" not in message


def write_cifar_tree(root: Path) -> Path:
    """A CIFAR-10-shaped tree: 10 class folders (capitalised), one 32x32 RGB image each in train/
    and test/, class k's of grey level 20 k."""
    for split in ("train", "test"):
        for k, cls in enumerate(CIFAR10_CLASSES):
            (root / split / cls.title()).mkdir(parents=True)
            Image.new("RGB", (32, 32), (20 * k,) * 3).save(root / split / cls.title() / "0.png")
    return root


@pytest.mark.parametrize("sub", ["", "cifar10-jpg", "cifar10"])
def test_cifar10_tree_in_data_dir_or_known_subfolder(tmp_path, sub):
    """Class folders named like CIFAR-10's, in another case, get its names and order."""
    write_cifar_tree(tmp_path / sub)
    for name in ("cifar-10", "cifar10", "CIFAR-10"):
        ds = load_dataset(name, tmp_path, download=False)
        assert (ds.name, len(ds.train), ds.augmentations) == ("cifar10", 10, ("flip", "crop"))
        assert ds.train.images.shape == (10, 3, 32, 32) and ds.classes == CIFAR10_CLASSES
        assert ds.train.labels.tolist() == list(range(10))
        assert ds.train.images[:, 0, 0, 0].tolist() == [20 * k for k in range(10)]
    assert canonical_name("cifar-10") == "cifar10"


def test_cifar10_tree_beside_the_binary_says_which_it_read(tmp_path):
    cifar = write_cifar_tree(tmp_path)
    (cifar / "cifar-10-batches-py").mkdir()
    ds = load_dataset("cifar10", cifar, download=False)
    binary = cifar / "cifar-10-batches-py"
    assert ds.source.startswith(f"image folders in {cifar} (.png) (the binary {binary} is also")
    assert ds.files == [str(cifar / "train"), str(cifar / "test")]


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("mode", ["RGB", "P"])
def test_grey_tree_with_one_colour_image_loads(gray_tree, split, mode):
    """One colour (or palette) image in a grey set makes the whole set colour, in both splits alike
    (as a colour image within a split already did), instead of a train/test shape error."""
    pixels = np.zeros((28, 28, 3), np.uint8)
    pixels[..., 0] = 204  # a colour of the web palette that convert("P") maps to
    Image.fromarray(pixels).convert(mode).save(gray_tree / split / "bee" / "zz-colour.png")
    ds = load_dataset("folder", gray_tree)
    assert ds.train.images.shape[1:] == ds.test.images.shape[1:] == (3, 28, 28)
    colour = ds.train if split == "train" else ds.test
    assert colour.images[colour.labels == 1][-1, :, 0, 0].tolist() == [204, 0, 0]
    first = torch.from_numpy(np.array(Image.open(gray_tree / "train" / "ant" / "000.png")))
    assert torch.equal(ds.train.images[0], first.expand(3, -1, -1))  # grey expanded


def test_mnist_tree_converts_a_colour_image_to_grey(tmp_path):
    root = tmp_path / "mnist"
    for split, count in (("train", 2), ("test", 1)):
        for digit in range(10):
            (root / split / str(digit)).mkdir(parents=True)
            for i in range(count):
                Image.new("L", (28, 28), 10 * digit).save(root / split / str(digit) / f"{i}.png")
    Image.new("RGB", (28, 28), (90, 90, 90)).save(root / "test" / "3" / "rgb.png")
    ds = load_dataset("mnist", tmp_path, download=False)
    assert ds.train.images.shape[1:] == (1, 28, 28) and ds.test.images[4, 0, 0, 0] == 90


@pytest.mark.parametrize(
    ("name", "mode", "side", "claim", "found"),
    [
        ("mnist", "RGB", 32, "28x28 grey", "32x32 grey of 3 classes"),  # read grey
        ("mnist", "L", 28, "28x28 grey", "28x28 grey of 3 classes"),
        ("fashion-mnist", "RGB", 32, "28x28 grey", "32x32 grey of 3 classes"),
        ("fashion-mnist", "L", 28, "28x28 grey", "28x28 grey of 3 classes"),
        ("cifar10", "L", 16, "32x32 colour", "16x16 grey of 3 classes"),
        ("cifar10", "RGB", 32, "32x32 colour", "32x32 colour of 3 classes"),
        ("cifar10", "RGB", 28, "32x32 colour", "28x28 colour of 3 classes"),
    ],
)
def test_data_set_names_refuse_data_of_another_shape(tmp_path, name, mode, side, claim, found):
    """A name is a claim: a 16x16 grey 2-class tree used to train as "cifar10" and be reported beside the study's."""
    write_image_tree(tmp_path / name, mode, side)
    message = f"{tmp_path / name}.*--dataset {name} is {claim} images of 10 classes, this data is {found}; use --dataset folder"
    with pytest.raises(DataError, match=message):
        load_dataset(name, tmp_path, download=False)


def test_digits():
    ds = load_dataset("digits")
    assert ds.name == "digits" and ds.classes == DIGIT_CLASSES
    assert ds.train.images.shape == (1437, 1, 16, 16) and ds.test.images.shape == (360, 1, 16, 16)
    assert ds.train.images.dtype == torch.uint8 and ds.train.labels.dtype == torch.int64
    assert ds.train.labels.unique().tolist() == ds.test.labels.unique().tolist() == list(range(10))
    assert ds.train.images.max() == 255  # scaled to the full byte range
    assert torch.equal(load_dataset("digits").test.images, ds.test.images)  # a fixed split


@pytest.mark.parametrize("name", ["imagenet", "svhn", ""])
def test_unknown_dataset(tmp_path, name):
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset(name, tmp_path, download=False)


def test_channel_stats_equal_float_statistics_on_the_unit_scale():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 3, 8, 8), generator=g, dtype=torch.uint8)
    images[:, 1] //= 4  # channels of different statistics
    images[:, 2] = 7  # a constant channel: std 1, so that standardising by it stays finite
    mean, std = channel_stats(images)
    x = images.double() / 255
    assert mean == pytest.approx(x.mean((0, 2, 3)).tolist(), abs=1e-12)
    assert std[:2] == pytest.approx(x.std((0, 2, 3), correction=0)[:2].tolist(), abs=1e-12)
    assert std[2] == 1.0


# exit code | main.py's arguments ({tmp}: the test's folder) | the error line holds
MAIN_REFUSALS = """
2 | --data-dir '' | error: --data-dir is empty; give the data set's folder, or drop the flag for ./data
2 | --data-dir {tmp} | error: --data-dir is not read by --dataset digits (bundled with scikit-learn); drop it
2 | --dataset mnist --data-dir {tmp}/loop | error: --data-dir {tmp}/loop does not exist or is not a folder
1 | --dataset folder --data-dir {tmp}/wide | error: {tmp}/wide/train/a/0.png: the image is 40x28, not square
1 | --dataset folder --data-dir {tmp}/same --model lenet++ | error: image folders in {tmp}/same (.png): all 2 train images
1 | --dataset folder --data-dir {tmp}/same | error: image folders in {tmp}/same (.png): all 2 train images
"""


@pytest.mark.parametrize("row", MAIN_REFUSALS.strip().splitlines())
def test_main_refuses_bad_data_in_one_line(tmp_path, capsys, row):
    """What used to download into ./data, crash at step 1 or end "done" having learned nothing: one line, no run folder."""
    code, argv, line = row.replace("{tmp}", str(tmp_path)).split(" | ")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    write_two_class_tree(tmp_path / "wide", lambda k: Image.new("L", (40, 28), 10 * k))
    write_two_class_tree(tmp_path / "same", lambda k: Image.new("L", (28, 28), 3))
    out = tmp_path / "out"
    try:
        result = main.main(
            [*shlex.split(argv), "--batch-size", "2", "--epochs", "1", "--out", str(out)]
        )
    except SystemExit as exc:
        result = exc.code
    assert result == int(code)
    assert line in stderr_error_line(capsys.readouterr().err)
    assert not out.exists()
