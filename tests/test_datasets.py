"""datasets.py: IDX files, torchvision's MNIST layout, image-folder trees, digits, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MNIST_TEST, MNIST_TRAIN, TREE_CLASSES, idx_bytes, write_idx, write_image_tree

from datasets import (
    CIFAR10_CLASSES,
    DIGIT_CLASSES,
    DataError,
    canonical_name,
    channel_stats,
    load_dataset,
)

# ------------------------------------------------------------------------------------------- IDX

RAW = ("MNIST", "raw")
GOOD_IMAGES = idx_bytes(np.zeros((100, 28, 28), np.uint8))


@pytest.mark.parametrize(
    ("stem", "data", "words"),
    [
        ("t10k-images-idx3-ubyte", GOOD_IMAGES[:1000], "damaged or truncated IDX file"),
        ("t10k-images-idx3-ubyte", GOOD_IMAGES + b"\0", "damaged or truncated IDX file"),
        (
            "train-labels-idx1-ubyte",
            bytes([0, 0, 8, 3]) + b"\0\0\0\4",
            "damaged or truncated IDX file",
        ),  # promises 3 sizes, holds 1
        (
            "train-images-idx3-ubyte",
            b"\x00\x00\x0d\x03" + bytes(20),
            "damaged or truncated IDX file",
        ),  # float data
        (
            "train-images-idx3-ubyte",
            b"\x50\x4b\x03\x04" + bytes(20),
            "damaged or truncated IDX file",
        ),  # a zip file
        ("t10k-labels-idx1-ubyte", b"\x00\x00", "damaged or truncated IDX file"),
        ("t10k-labels-idx1-ubyte", b"", "damaged or truncated IDX file"),
        (
            "t10k-labels-idx1-ubyte",
            idx_bytes(np.zeros((100, 1, 1), np.uint8)),
            "damaged or truncated IDX file",
        ),  # labels of rank 3
        (
            "train-images-idx3-ubyte",
            idx_bytes(np.zeros((200, 784), np.uint8)),
            "damaged or truncated IDX file",
        ),  # images of rank 2
        (
            "train-images-idx3-ubyte",
            idx_bytes(np.zeros((0, 28, 28), np.uint8)),
            "an IDX file of no items",
        ),
        (
            "t10k-images-idx3-ubyte",
            idx_bytes(np.zeros((100, 0, 28), np.uint8)),
            "an IDX file of no items",
        ),
    ],
)
def test_damaged_idx_file_is_one_line_naming_it(tiny_mnist, stem, data, words):
    """Whatever torchvision's IDX reader raises (asserts, ValueError, RuntimeError, TypeError) becomes one DataError line."""
    root, _ = tiny_mnist
    path = root.joinpath(*RAW, stem)
    path.write_bytes(data)
    with pytest.raises(DataError) as info:
        load_dataset("mnist", root, download=False)
    message = str(info.value)
    assert (
        message.startswith(f"{path}: {words}")
        and message.endswith("replace it with the original")
        and "\n" not in message
    )


# ------------------------------------------------------------------------------- MNIST (IDX tree)


def test_load_mnist_from_idx_tree(tiny_mnist):
    root, arrays = tiny_mnist
    ds = load_dataset("mnist", root, download=False)
    assert ds.name == "mnist" and ds.classes == DIGIT_CLASSES
    assert ds.channels == 1 and ds.image_size == 28
    assert ds.augmentations == ("rotate",)
    for split, key in ((ds.train, "train"), (ds.test, "t10k")):
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        n = MNIST_TRAIN if key == "train" else MNIST_TEST
        assert split.images.shape == (n, 1, 28, 28) and split.labels.shape == (n,)
        assert np.array_equal(split.images[:, 0].numpy(), arrays[f"{key}_images"])
        assert np.array_equal(split.labels.numpy(), arrays[f"{key}_labels"].astype(np.int64))


def test_load_mnist_count_mismatch(tiny_mnist):
    root, arrays = tiny_mnist
    write_idx(root / "MNIST" / "raw" / "train-labels-idx1-ubyte", arrays["train_labels"][:-3])
    with pytest.raises(DataError, match="labels"):
        load_dataset("mnist", root, download=False)


def test_load_mnist_label_out_of_range(tiny_mnist):
    root, arrays = tiny_mnist
    labels = arrays["t10k_labels"].copy()
    labels[5] = 12
    write_idx(root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", labels)
    with pytest.raises(DataError, match="12"):
        load_dataset("mnist", root, download=False)


def test_missing_mnist_without_download(tmp_path):
    with pytest.raises(DataError, match="not found") as info:
        load_dataset("mnist", tmp_path, download=False)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(DataError, match="not found"):
        load_dataset("fashion-mnist", tmp_path, download=False)
    with pytest.raises(DataError, match="not found"):
        load_dataset("cifar10", tmp_path, download=False)


def test_fashion_mnist_idx_and_alias(tmp_path):
    rng = np.random.default_rng(1)
    raw = tmp_path / "FashionMNIST" / "raw"
    for split, n in (("train", 20), ("t10k", 10)):
        write_idx(
            raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        )
        write_idx(raw / f"{split}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    ds = load_dataset("fashion_mnist", tmp_path, download=False)
    assert ds.name == "fashion-mnist" and len(ds.train) == 20 and len(ds.test) == 10
    assert ds.classes[0] == "T-shirt/top" and ds.augmentations == ("flip", "rotate")


# ------------------------------------------------------------------------------ image-folder trees


def test_gray_tree(gray_tree):
    ds = load_dataset("folder", gray_tree)
    assert ds.classes == list(TREE_CLASSES)
    assert ds.train.images.shape == (12, 1, 28, 28) and ds.test.images.shape == (6, 1, 28, 28)
    assert ds.train.images.dtype == torch.uint8 and ds.train.labels.dtype == torch.int64
    assert ds.train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    from PIL import Image

    first = np.array(Image.open(gray_tree / "train" / "bee" / "001.png"))
    assert np.array_equal(ds.train.images[5, 0].numpy(), first)
    assert ds.augmentations == ()


def test_rgb_tree(rgb_tree):
    ds = load_dataset("folder", rgb_tree)
    assert ds.channels == 3 and ds.image_size == 32
    assert ds.train.images.shape == (12, 3, 32, 32)
    from PIL import Image

    pixels = np.array(Image.open(rgb_tree / "test" / "cat" / "001.png").convert("RGB"))
    assert np.array_equal(ds.test.images[5].permute(1, 2, 0).numpy(), pixels)


def test_tree_with_alpha_and_mixed_gray_rgb(tmp_path):
    from PIL import Image

    root = tmp_path / "mixed"
    for split in ("train", "test"):
        for k, cls in enumerate(("a", "b")):
            (root / split / cls).mkdir(parents=True)
            Image.new("RGBA", (28, 28), (10 * k, 20, 30, 255)).save(root / split / cls / "0.png")
            Image.new("L", (28, 28), 77).save(root / split / cls / "1.png")
    ds = load_dataset("folder", root)
    assert ds.channels == 3
    assert ds.train.images[0, :, 0, 0].tolist() == [0, 20, 30]  # alpha dropped
    assert ds.train.images[1, :, 0, 0].tolist() == [77, 77, 77]  # gray expanded


def write_two_class_tree(root: Path, make_image, suffix: str = ".png") -> Path:
    for split in ("train", "test"):
        for k, cls in enumerate(("a", "b")):
            (root / split / cls).mkdir(parents=True)
            make_image(k).save(root / split / cls / f"0{suffix}")
    return root


def test_tree_palette_png_gives_its_colours(tmp_path):
    from PIL import Image

    def red(k):
        pixels = np.zeros((28, 28, 3), np.uint8)
        pixels[..., 0], pixels[..., 2] = 200, 50 * k
        return Image.fromarray(pixels).convert("P", palette=Image.Palette.ADAPTIVE)

    ds = load_dataset("folder", write_two_class_tree(tmp_path / "p", red))
    assert ds.channels == 3
    assert ds.train.images[:, :, 0, 0].tolist() == [[200, 0, 0], [200, 0, 50]]


def test_tree_16_bit_png_is_refused(tmp_path):
    from PIL import Image

    def deep(k):
        return Image.fromarray(np.full((28, 28), 1000 * (k + 1), np.uint16))

    root = write_two_class_tree(tmp_path / "i16", deep)
    with pytest.raises(DataError, match="16/32-bit") as info:
        load_dataset("folder", root)
    assert str(root / "train" / "a" / "0.png") in str(info.value)


def test_tree_cmyk_jpeg_gives_rgb(tmp_path):
    from PIL import Image

    def dark(k):
        return Image.fromarray(np.full((28, 28, 3), 20 * k, np.uint8)).convert("CMYK")

    ds = load_dataset("folder", write_two_class_tree(tmp_path / "cmyk", dark, suffix=".jpg"))
    assert ds.channels == 3
    assert ds.train.images.max() < 60  # dark, not the white of a dropped K channel


def write_cifar_tree(root: Path) -> Path:
    """A CIFAR-10-shaped tree: 10 class folders, one 32x32 RGB image each in train/ and test/."""
    from PIL import Image

    for split in ("train", "test"):
        for k, cls in enumerate(CIFAR10_CLASSES):
            (root / split / cls.title()).mkdir(parents=True)
            Image.fromarray(np.full((32, 32, 3), 20 * k, np.uint8)).save(
                root / split / cls.title() / "0.png"
            )
    return root


@pytest.mark.parametrize("sub", ["", "cifar10-jpg", "cifar10"])
def test_cifar10_tree_in_data_dir_or_known_subfolder(tmp_path, sub):
    write_cifar_tree(tmp_path / sub)
    for name in ("cifar-10", "cifar10", "CIFAR-10"):
        ds = load_dataset(name, tmp_path, download=False)
        assert (ds.name, len(ds.train), ds.augmentations) == ("cifar10", 10, ("flip", "crop"))
        assert ds.train.images.shape == (10, 3, 32, 32)
    assert canonical_name("cifar-10") == "cifar10"


def test_cifar10_tree_with_cifar_class_folders_gets_the_canonical_names(tmp_path):
    """Class folders named like CIFAR-10's classes, in another case, are labelled in CIFAR-10's order
    and given its names."""
    write_cifar_tree(tmp_path / "cifar10")
    ds = load_dataset("cifar10", tmp_path, download=False)
    assert ds.classes == CIFAR10_CLASSES
    assert ds.train.labels.tolist() == list(range(10))
    # each class folder's own image
    assert ds.train.images[:, 0, 0, 0].tolist() == [20 * k for k in range(10)]


def test_tree_image_of_other_size(gray_tree):
    from PIL import Image

    odd = gray_tree / "train" / "bee" / "zzz.png"
    Image.new("L", (20, 20)).save(odd)
    with pytest.raises(DataError) as info:
        load_dataset("folder", gray_tree)
    assert str(odd) in str(info.value)
    assert "20x20" in str(info.value)


def test_tree_train_test_sizes_differ(tmp_path):

    root = write_image_tree(tmp_path / "t", "L", 28, per_class=(1, 1))
    shutil.rmtree(root / "test")
    write_image_tree(tmp_path / "other", "L", 32, per_class=(1, 1))
    shutil.copytree(tmp_path / "other" / "test", root / "test")
    with pytest.raises(DataError):
        load_dataset("folder", root)


def test_tree_garbage_png(gray_tree):
    bad = gray_tree / "test" / "ant" / "x.png"
    bad.write_bytes(b"this is not a png at all" * 10)
    with pytest.raises(DataError) as info:
        load_dataset("folder", gray_tree)
    assert str(bad) in str(info.value)


def test_tree_non_image_suffix(gray_tree):
    bad = gray_tree / "train" / "cat" / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(DataError) as info:
        load_dataset("folder", gray_tree)
    assert str(bad) in str(info.value)


def test_tree_hidden_files_are_ignored(gray_tree):
    (gray_tree / "train" / "cat" / ".DS_Store").write_bytes(b"\0\1")
    assert len(load_dataset("folder", gray_tree).train) == 12


def test_tree_empty_class_folder(gray_tree):
    (gray_tree / "train" / "dog").mkdir()
    with pytest.raises(DataError, match="empty") as info:
        load_dataset("folder", gray_tree)
    assert "dog" in str(info.value)


def test_tree_class_missing_in_test(gray_tree):
    shutil.rmtree(gray_tree / "test" / "bee")
    with pytest.raises(DataError, match="bee"):
        load_dataset("folder", gray_tree)


def test_folder_without_tree(tmp_path):
    with pytest.raises(DataError, match="train"):
        load_dataset("folder", tmp_path)


# ------------------------------------------------------------------------------------ digits, names


def test_digits():
    ds = load_dataset("digits")
    assert ds.name == "digits" and ds.classes == DIGIT_CLASSES
    assert len(ds.train) == 1437 and len(ds.test) == 360
    assert ds.train.images.shape == (1437, 1, 16, 16) and ds.test.images.shape == (360, 1, 16, 16)
    assert ds.train.images.dtype == torch.uint8 and ds.train.labels.dtype == torch.int64
    assert sorted(ds.train.labels.unique().tolist()) == list(range(10))
    assert sorted(ds.test.labels.unique().tolist()) == list(range(10))
    assert ds.train.images.max() > 200  # scaled to the full byte range
    # Deterministic split.
    again = load_dataset("digits")
    assert torch.equal(again.test.images, ds.test.images)


@pytest.mark.parametrize("name", ["imagenet", "svhn", ""])
def test_unknown_dataset(tmp_path, name):
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset(name, tmp_path, download=False)


def test_image_data_to_and_len(tiny_mnist):
    root, _ = tiny_mnist
    ds = load_dataset("mnist", Path(root), download=False)
    moved = ds.train.to("cpu")
    assert len(moved) == MNIST_TRAIN and torch.equal(moved.images, ds.train.images)


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


# ------------------------------------------------------------------------ data that cannot be what it says


def test_tree_of_a_single_class_is_refused(gray_tree):
    for cls in TREE_CLASSES[1:]:
        shutil.rmtree(gray_tree / "train" / cls)
        shutil.rmtree(gray_tree / "test" / cls)
    with pytest.raises(
        DataError,
        match=f"{gray_tree / 'train'}: only the class 'ant'; a classifier needs at least two",
    ):
        load_dataset("folder", gray_tree)


def test_tree_test_class_without_train_folder_is_named(gray_tree):
    """Its images were silently dropped: the test set looked easier than it was."""
    shutil.copytree(gray_tree / "test" / "bee", gray_tree / "test" / "dog")
    with pytest.raises(DataError, match="the classes dog have no folder in") as info:
        load_dataset("folder", gray_tree)
    assert str(gray_tree / "test") in str(info.value)


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("mode", ["RGB", "P"])
def test_grey_tree_with_one_colour_image_loads(gray_tree, split, mode):
    """One colour (or palette) image in a grey set makes the whole set colour, in both splits alike
    (as a colour image within a split already did), instead of a train/test shape error."""
    from PIL import Image

    pixels = np.zeros((28, 28, 3), np.uint8)
    pixels[..., 0] = 204  # a colour of the web palette that convert("P") maps to
    Image.fromarray(pixels).convert(mode).save(gray_tree / split / "bee" / "zz-colour.png")
    ds = load_dataset("folder", gray_tree)
    assert ds.train.images.shape[1:] == ds.test.images.shape[1:] == (3, 28, 28)
    colour = ds.train if split == "train" else ds.test
    assert colour.images[colour.labels == 1][-1, :, 0, 0].tolist() == [204, 0, 0]
    first = np.array(Image.open(gray_tree / "train" / "ant" / "000.png"))
    # grey expanded
    assert all(np.array_equal(ds.train.images[0, c].numpy(), first) for c in range(3))


def test_mnist_tree_converts_a_colour_image_to_grey(tmp_path):
    from PIL import Image

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


def test_idx_mnist_of_another_size_is_refused(tiny_mnist):
    root, arrays = tiny_mnist
    for split in ("train", "t10k"):
        write_idx(
            root / "MNIST" / "raw" / f"{split}-images-idx3-ubyte",
            np.zeros((len(arrays[f"{split}_labels"]), 32, 32), np.uint8),
        )
    with pytest.raises(DataError, match="this data is 32x32 grey of 10 classes"):
        load_dataset("mnist", root, download=False)


def test_source_and_files_say_what_was_read(tiny_mnist, tmp_path):
    root, _ = tiny_mnist
    ds = load_dataset("mnist", root, download=False)
    raw = root / "MNIST" / "raw"
    assert ds.source == f"IDX files in {raw}"
    assert ds.files == [
        str(raw / f"{s}-{k}-idx{r}-ubyte")
        for s in ("train", "t10k")
        for k, r in (("images", 3), ("labels", 1))
    ]
    cifar = write_cifar_tree(tmp_path / "cifar")
    (
        cifar / "cifar-10-batches-py"
    ).mkdir()  # the lossless binary beside a tree: the tree is read, and the line says so
    ds = load_dataset("cifar10", cifar, download=False)
    assert ds.source.startswith(
        f"image folders in {cifar} (.png) (the binary {cifar / 'cifar-10-batches-py'} is also there, not used"
    )
    assert ds.files == [str(cifar / "train"), str(cifar / "test")]


# ------------------------------------------------------------------- hostile trees and flags (issue 30)


def test_non_square_tree_is_refused_before_training(tmp_path):
    """Only the width used to be compared: 40x28 images crashed the models at step 1."""
    from PIL import Image

    root = write_two_class_tree(tmp_path / "wide", lambda k: Image.new("L", (40, 28), 10 * k))
    with pytest.raises(
        DataError,
        match=r"0.png: the image is 40x28, not square; resize or crop every image to one square size",
    ) as info:
        load_dataset("folder", root)
    assert str(info.value).startswith(str(root / "train" / "a" / "0.png"))


def test_tree_image_of_same_width_other_height_is_named(gray_tree):
    from PIL import Image

    odd = gray_tree / "test" / "cat" / "zzz.png"
    Image.new("L", (28, 20)).save(odd)
    with pytest.raises(DataError, match="the image is 28x20") as info:
        load_dataset("folder", gray_tree)
    assert str(info.value).startswith(str(odd))


def test_train_images_all_alike_are_refused(tmp_path, tiny_mnist):
    from PIL import Image

    root = write_two_class_tree(tmp_path / "same", lambda k: Image.new("RGB", (32, 32), (9, 9, 9)))
    with pytest.raises(DataError, match="all 2 train images are the same image"):
        load_dataset("folder", root)
    data, arrays = tiny_mnist
    write_idx(
        data / "MNIST" / "raw" / "train-images-idx3-ubyte", np.zeros_like(arrays["train_images"])
    )
    with pytest.raises(DataError, match=f"all {MNIST_TRAIN} train images are the same image"):
        load_dataset("mnist", data, download=False)


def test_decompression_bomb_is_one_line(gray_tree, monkeypatch):
    from PIL import Image

    # 28x28 is then over twice the limit: PIL's DecompressionBombError
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match="could be decompression bomb") as info:
        load_dataset("folder", gray_tree)
    assert str(info.value).startswith(str(gray_tree / "train" / "ant" / "000.png"))


@pytest.mark.parametrize("unlisted", ["test", "train/bee", "test/cat"])
def test_folder_that_cannot_be_listed_is_one_line(gray_tree, monkeypatch, unlisted):
    """Tests run as root, who may list any folder: os.scandir is made to raise what a user without the right gets."""
    import os

    scandir, target = os.scandir, str(gray_tree / unlisted)

    def refuse(path="."):
        if str(path) == target:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)  # os.walk (DatasetFolder's) calls it too
    with pytest.raises(DataError, match=f"^{target}: cannot be listed \\(Permission denied\\)"):
        load_dataset("folder", gray_tree)


def test_link_loop_in_a_class_folder_is_one_line(gray_tree):
    loop = gray_tree / "train" / "bee" / "again"
    loop.symlink_to(gray_tree / "train" / "bee")
    with pytest.raises(
        DataError,
        match=f"^{loop}: the same folder as {gray_tree / 'train' / 'bee'}, through a link",
    ):
        load_dataset("folder", gray_tree)


def test_test_class_linked_to_its_train_folder_is_refused(gray_tree):
    """A test class that is its train folder through a link would score the train images as test images."""
    shutil.rmtree(gray_tree / "test" / "cat")
    (gray_tree / "test" / "cat").symlink_to(gray_tree / "train" / "cat")
    with pytest.raises(
        DataError,
        match=f"^{gray_tree / 'test' / 'cat'}: the same folder as {gray_tree / 'train' / 'cat'}, through a link",
    ):
        load_dataset("folder", gray_tree)


def test_class_entry_that_is_a_symlink_loop_is_one_line(gray_tree):
    loop = gray_tree / "train" / "zz"
    loop.symlink_to(loop)
    with pytest.raises(
        DataError, match=f"^{loop}: cannot be listed \\(Too many levels of symbolic links\\)"
    ):
        load_dataset("folder", gray_tree)


def test_a_fifo_among_the_images_is_skipped_not_waited_on(gray_tree):
    """PIL's open would wait for a writer forever; DatasetFolder's filter keeps regular files only."""
    import os

    os.mkfifo(gray_tree / "train" / "ant" / "pipe.png")
    assert len(load_dataset("folder", gray_tree).train) == 12


def test_images_in_sub_folders_of_a_class_are_read(gray_tree):
    """torchvision's DatasetFolder walks a class folder's sub-folders; hidden ones are skipped."""
    shutil.copytree(gray_tree / "train" / "bee", gray_tree / "train" / "bee" / "more")
    shutil.copytree(gray_tree / "train" / "ant", gray_tree / "train" / "ant" / ".ipynb_checkpoints")
    ds = load_dataset("folder", gray_tree)
    assert ds.train.labels.tolist() == [0] * 4 + [1] * 8 + [2] * 4


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (
            lambda root: (root / "train" / "loose.png").write_bytes(b""),
            "a file where only class folders belong",
        ),
        (
            lambda root: (root / "train" / "bee" / "blank.png").write_bytes(b""),
            "cannot be decoded as an image",
        ),
        (
            lambda root: (root / "train" / "cat" / "a.jpg").write_bytes(
                b"\xff\xd8\xff\xe0 cut short"
            ),
            "cannot be decoded as an image",
        ),
        (lambda root: shutil.rmtree(root / "test"), "--dataset folder needs"),
    ],
    ids=["file-among-class-folders", "0-byte-image", "cut-jpeg", "train-without-test"],
)
def test_odd_tree_is_one_line(gray_tree, make, words):
    make(gray_tree)
    with pytest.raises(DataError, match=words):
        load_dataset("folder", gray_tree)


def test_one_pixel_images_load(tmp_path):
    """A 1x1 tree is data (the model's size check in main.py refuses it with its own line)."""
    from PIL import Image

    ds = load_dataset(
        "folder", write_two_class_tree(tmp_path / "dot", lambda k: Image.new("L", (1, 1), 100 * k))
    )
    assert ds.train.images.shape == (2, 1, 1, 1) and ds.train.images.flatten().tolist() == [0, 100]


@pytest.mark.parametrize(
    ("argv", "code", "line"),
    [
        (
            ["--data-dir", ""],
            2,
            "error: --data-dir is empty; give the data set's folder, or drop the flag for ./data",
        ),
        (
            ["--data-dir", "{tmp}"],
            2,
            "error: --data-dir is not read by --dataset digits (bundled with scikit-learn); drop it",
        ),
        (
            ["--dataset", "mnist", "--data-dir", "{tmp}/loop"],
            2,
            "error: --data-dir {tmp}/loop does not exist or is not a folder",
        ),
        (
            ["--dataset", "folder", "--data-dir", "{tmp}/wide"],
            1,
            "error: {tmp}/wide/train/a/0.png: the image is 40x28, ",
        ),
        (
            ["--dataset", "folder", "--data-dir", "{tmp}/same", "--model", "lenet++"],
            1,
            "error: image folders in {tmp}/same (.png): all 2 ",
        ),
        (
            ["--dataset", "folder", "--data-dir", "{tmp}/same"],
            1,
            "error: image folders in {tmp}/same (.png): all 2 train images ",
        ),
    ],
)
def test_main_refuses_bad_data_in_one_line(tmp_path, capsys, argv, code, line):
    """What used to download into ./data, crash at step 1 or end "done" having learned nothing: one line, no run folder."""
    from conftest import stderr_error_line
    from PIL import Image

    import main

    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    write_two_class_tree(tmp_path / "wide", lambda k: Image.new("L", (40, 28), 10 * k))
    write_two_class_tree(tmp_path / "same", lambda k: Image.new("L", (28, 28), 3))
    out = tmp_path / "out"
    try:
        result = main.main(
            [a.replace("{tmp}", str(tmp_path)) for a in argv]
            + ["--batch-size", "2", "--epochs", "1", "--out", str(out)]
        )
    except SystemExit as exc:
        result = exc.code
    assert result == code
    assert line.replace("{tmp}", str(tmp_path)) in stderr_error_line(capsys.readouterr().err)
    assert not out.exists()
