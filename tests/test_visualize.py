"""visualize.py: per-epoch frames of 2-D runs, one axis range per run, GIFs, projections, the CLI."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from conftest import check_ok, listing, run_script, stderr_error_line
from PIL import Image

import utils
import visualize
from config import parse_args
from datasets import DIGIT_CLASSES
from epoch import record_step
from losses import Objective
from main import main
from training import EpochState

EPOCHS = 2
QUICK = "--epochs 1 --train-samples 64 --batch-size 32 --model lenet++".split()


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    """A private copy of a shared run, for tests that write into it."""
    return Path(shutil.copytree(run_dir, tmp_path / run_dir.name))


def frame_pngs(run_dir: Path, split: str) -> list[Path]:
    return sorted((run_dir / "frames" / split).glob("epoch_*.png"))


@pytest.mark.parametrize("loss", ["xent", "cent", "standalone"])
def test_frames_per_epoch(tiny_runs, loss):
    run_dir = tiny_runs[loss]
    for split in visualize.SPLITS:
        names = [p.name for p in frame_pngs(run_dir, split)]
        assert names == [f"epoch_{e:03d}.png" for e in range(1, EPOCHS + 1)]
        for name in names:
            data = np.load(run_dir / "frames" / split / name.replace(".png", ".npz"))
            assert data["features"].ndim == 2 and data["features"].shape[1] == 2
            assert len(data["labels"]) == len(data["features"]) > 0
            assert data["centers"].shape == ((0, 2) if loss == "xent" else (10, 2))
            assert np.isfinite(data["features"]).all()
    val = np.load(run_dir / "frames" / "test" / "epoch_001.npz")
    assert len(val["features"]) == 100  # the whole tiny test set
    # The run ends with its GIFs, one frame per epoch, and no projections (they are for feat_dim > 2).
    assert not (run_dir / "train.png").exists()
    for split in visualize.SPLITS:
        assert len(iio.imread(run_dir / f"{split}.gif", index=None)) == EPOCHS


def test_frames_share_one_axis_range(tiny_runs, tmp_path):
    """One axis range, the union of every frame's robust range; redrawing changes no frame."""
    run_dir = copy_run(tiny_runs["standalone"], tmp_path)
    limits = visualize.draw_frames(run_dir, DIGIT_CLASSES)
    ranges = []
    for npz in sorted((run_dir / "frames").glob("*/epoch_*.npz")):
        d = np.load(npz)
        ranges.append(visualize.robust_limits(np.concatenate([d["features"], d["centers"]])))
    assert len(ranges) == 2 * EPOCHS
    ranges = np.stack(ranges)
    np.testing.assert_allclose(limits[:, 0], ranges[:, :, 0].min(0))
    np.testing.assert_allclose(limits[:, 1], ranges[:, :, 1].max(0))
    # All frames are images of one size (a GIF needs that).
    side = int(visualize.FRAME_SIZE_INCHES * visualize.FRAME_DPI)
    for split in visualize.SPLITS:
        for new, old in zip(frame_pngs(run_dir, split), frame_pngs(tiny_runs["standalone"], split)):
            assert iio.imread(new).shape[:2] == (side, side)
            assert np.array_equal(iio.imread(new), iio.imread(old)), new.name
    assert visualize.draw_frames(tmp_path, DIGIT_CLASSES) is None  # a folder without frames


def test_the_train_frame_spreads_over_the_whole_epoch():
    """Each step keeps its first frame_take points (NaN for a bad step), so all steps are drawn."""
    objective = Objective("standalone", 10, 2)
    run = SimpleNamespace(args=parse_args([]), objective=objective, collect_frames=True)
    run.frame_take = 3
    state = EpochState.new(10, 2, torch.device("cpu"), torch.Generator())
    for step in range(6):
        features, y, finite = (
            torch.full((8, 2), float(step)),
            torch.arange(8),
            torch.tensor(step != 4),
        )
        record_step(
            run, state, features, torch.zeros(8, 10), y, torch.ones(()), {}, ~finite, finite
        )
    points = torch.cat(state.frame_features)[:, 0].nan_to_num(-1)
    assert torch.equal(points, torch.tensor([0, 1, 2, 3, -1, 5.0]).repeat_interleave(3))
    assert torch.equal(torch.cat(state.frame_labels), torch.arange(3).repeat(6))


def test_a_damaged_frame_found_at_the_end_is_one_line(tmp_path, capsys):
    """An epoch's .npz cut short before a resume: exit 1, one line naming it, no summary.json."""
    args = [*QUICK, "--out", str(tmp_path), "--name", "run"]
    assert main([*args, "--epochs", "1"]) == 0
    run_dir = tmp_path / "run"
    bad = run_dir / "frames" / "train" / "epoch_001.npz"
    bad.write_bytes(bad.read_bytes()[:100])
    (run_dir / "summary.json").unlink()
    capsys.readouterr()
    assert main([*args, "--epochs", "2"]) == 1
    line = stderr_error_line(capsys.readouterr().err)
    assert f"{bad}: damaged frame data" in line
    assert not (run_dir / "summary.json").exists()
    assert (run_dir / "frames" / "test" / "epoch_002.npz").is_file()


def test_robust_limits_pad_the_quantiles_and_ignore_outliers():
    """The limits reach past the 0.5% / 99.5% quantiles by 8% of their span (of 1e-6 at least)."""
    points = np.random.default_rng(0).normal(size=(2000, 2))
    points[:5] = [[1e6, -1e6], [-1e6, 1e6], [5e5, 5e5], [-7e5, 0], [0, 9e5]]
    low, high = np.quantile(points, 0.005, axis=0), np.quantile(points, 0.995, axis=0)
    want = np.stack([low - 0.08 * (high - low), high + 0.08 * (high - low)], 1)
    np.testing.assert_allclose(visualize.robust_limits(points), want)
    limits = visualize.robust_limits(np.ones((10, 2)))
    np.testing.assert_allclose(limits, [[1 - 0.08e-6, 1 + 0.08e-6]] * 2, rtol=0, atol=1e-12)


def test_cli_makes_gifs_and_copies_to_imgs(tiny_runs, tmp_path, monkeypatch):
    """visualize.py RUN --to-imgs stitches the GIFs again and copies them; without --to-imgs it
    copies nothing (to the default ./imgs)."""
    run_dir = copy_run(tiny_runs["cent"], tmp_path)
    imgs = tmp_path / "imgs"
    for split in visualize.SPLITS:
        (run_dir / f"{split}.gif").unlink()
    proc = check_ok(run_script("visualize.py", [run_dir, "--to-imgs", "--imgs-dir", imgs]))
    assert f"{EPOCHS} frames" in proc.stdout
    png_shape = iio.imread(frame_pngs(run_dir, "train")[0]).shape
    for split in visualize.SPLITS:
        gif = run_dir / f"{split}.gif"
        assert iio.improps(gif, index=None).shape[:3] == (EPOCHS, *png_shape[:2])
        assert (imgs / "cent-mnist-feat=2" / f"{split}.gif").read_bytes() == gif.read_bytes()
    assert sorted(p.name for p in (imgs / run_dir.name).iterdir()) == ["test.gif", "train.gif"]
    shutil.rmtree(imgs)
    (run_dir / "train.gif").unlink()
    monkeypatch.chdir(tmp_path)
    assert visualize.main([str(run_dir)]) == 0
    assert (run_dir / "train.gif").is_file() and not imgs.exists()


@pytest.mark.parametrize(
    "path, content, message",
    [
        ("frames", None, "no frames"),
        ("", None, "no such run folder"),
        ("frames/test/epoch_002.png", "cut", "epoch_002.png: not readable as an image"),
        ("frames/train/epoch_001.png", "no image", "epoch_001.png: not readable as an image"),
        ("frames/train/epoch_002.png", "small", "a 40x30 frame among 400x400"),
        ("args.json", '{"loss": "cent", ', "args.json: damaged (JSONDecodeError)"),
        ("args.json", '["cent", "mnist", 2]', "args.json: damaged (TypeError)"),
        ("args.json", '{"loss": "cent"}', "args.json: damaged (KeyError)"),
        ("../imgs", "a file where --imgs-dir should be", "--imgs-dir"),
    ],
)
def test_cli_damaged_input_is_one_line(tiny_runs, tmp_path, capsys, path, content, message):
    """Exit 1, one line; no file added anywhere (a GIF stitched before the damage may change)."""
    run_dir = copy_run(tiny_runs["cent"], tmp_path)
    target = run_dir / path  # removed (None), cut short, a small image or the text given
    if content is None:
        shutil.rmtree(target)
    elif content in ("cut", "small"):
        small = iio.imwrite("<bytes>", np.zeros((30, 40, 3), np.uint8), extension=".png")
        target.write_bytes(target.read_bytes()[:200] if content == "cut" else small)
    else:
        target.write_text(content)
    before = listing(tmp_path)
    assert visualize.main([str(run_dir), "--to-imgs", "--imgs-dir", str(tmp_path / "imgs")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in stderr_error_line(err)
    after = listing(tmp_path)
    assert set(after) == set(before)
    assert all(after[k] == before[k] for k in after if not k.endswith(".gif"))


def test_high_dim_run_writes_projections(projection_run, tmp_path):
    run_dir = projection_run
    assert (run_dir / "summary.json").is_file()
    for name in ("train.png", "test.png"):
        image = iio.imread(run_dir / name)
        assert image.shape[:2] == (900, 900) and image[..., :3].std() > 0  # not a blank canvas
    assert not (run_dir / "frames").exists()  # no 2-D frames for feat_dim 16
    # The CLI copies the projections of such a run.
    imgs = tmp_path / "imgs"
    copy = copy_run(run_dir, tmp_path)
    assert visualize.main([str(copy), "--to-imgs", "--imgs-dir", str(imgs)]) == 0
    names = sorted(p.name for p in (imgs / "standalone-mnist-feat=16").iterdir())
    assert names == ["test.png", "train.png"]


def test_no_plots_writes_no_frames(named_run):
    files = {p.name for p in named_run[1].iterdir()}
    assert "summary.json" in files and not {"frames", "train.gif", "train.png"} & files


def test_project_2d_pca():
    rng = np.random.default_rng(0)
    base = torch.tensor(rng.normal(size=(50, 1)) * 10)
    features = torch.cat([base, 2 * base, torch.tensor(rng.normal(size=(50, 14)) * 0.01)], 1)
    points = visualize.project_2d(features)
    assert points.shape == (50, 2)
    # Nearly all the variance lies on the first component.
    assert points[:, 0].var() > 100 * points[:, 1].var()


def test_class_colors_distinct():
    for n in (3, 10, 20, 25):
        colors = visualize.class_colors(n)
        assert colors.shape == (n, 4)
        assert len({tuple(np.round(c, 4)) for c in colors}) == n


@pytest.mark.parametrize("count", [1, 3])
def test_make_gif_of_one_or_more_frames(tmp_path, count):
    """A 1-epoch run's GIF (Pillow's single-frame path) as well as a longer one; the last frame lingers."""
    (tmp_path / "frames" / "test").mkdir(parents=True)
    for i in range(count):
        frame = tmp_path / "frames" / "test" / f"epoch_{i:03d}.png"
        iio.imwrite(frame, np.full((8, 10, 3), 40 * i, dtype=np.uint8))
    gifs = visualize.make_run_gifs(tmp_path, duration=0.3, last_pause=1.5)
    assert gifs == [tmp_path / "test.gif"]
    assert iio.imread(gifs[0], index=None).shape[:3] == (count, 8, 10)
    with Image.open(gifs[0]) as im:
        durations = [(im.seek(i), im.info["duration"])[1] for i in range(im.n_frames)]
    assert durations == [300] * (count - 1) + [1500]


def write_geometry_csv(run_dir, rows):
    """metrics.csv with the geometry columns; a None value is an epoch without them (an empty cell)."""
    run_dir.mkdir(parents=True)
    lines = ["epoch,test_acc," + ",".join(visualize.GEOMETRY_METRICS)]
    for epoch, values in rows:
        lines.append(f"{epoch},0.5," + ",".join("" if v is None else str(v) for v in values))
    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_geometry_over_epochs_of_several_runs(tmp_path, capsys):
    """--geometry reads each run's geometry columns (epochs without them left out), one picture."""
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    rows = [(1, [2.0, 8, 9, 4, 4.5, 10]), (2, [None] * 6), (3, [1.0, 8, 9, 8, 9, 11])]
    write_geometry_csv(a, rows)
    write_geometry_csv(b, [(1, [3.0, 1.5, 2.0, 0.5, 0.75, 5.0])])
    series = visualize.geometry_series(a)
    assert series["intra_distance"] == ([1, 3], [2.0, 1.0])
    assert series["min_gap_ratio"] == ([1, 3], [4.0, 8.0])
    out = tmp_path / "geometry.png"
    assert visualize.main(["--geometry", str(a), str(b), "--out", str(out)]) == 0
    assert Image.open(out).size == (1300, 700)
    names = ", ".join(visualize.GEOMETRY_METRICS)
    assert capsys.readouterr().out == f"{out}: {names} of 2 run(s)\n"


@pytest.mark.parametrize(
    "bad, out, message",
    [
        ("no-columns", "g.png", "metrics.csv: none of the geometry columns"),
        ("no-csv", "g.png", "metrics.csv: not readable (FileNotFoundError"),
        ("bad-value", "g.png", "metrics.csv: not readable (ValueError"),
        ("good", "g.txt", "--out {tmp}/g.txt: give a .png, .svg or .pdf file"),
    ],
)
def test_geometry_bad_input_is_one_line_and_draws_nothing(tmp_path, capsys, bad, out, message):
    write_geometry_csv(tmp_path / "good", [(1, [2.0, 8.0, 9.0, 4.0, 4.5, 10.0])])
    (tmp_path / "no-csv").mkdir()
    write_geometry_csv(tmp_path / "bad-value", [(1, ["x"] * 6)])
    write_geometry_csv(tmp_path / "no-columns", [])
    (tmp_path / "no-columns" / "metrics.csv").write_text("epoch,test_acc\n1,0.5\n")
    before = listing(tmp_path)
    argv = ["--geometry", str(tmp_path / "good"), str(tmp_path / bad), "--out", str(tmp_path / out)]
    assert visualize.main(argv) == 1
    assert message.format(tmp=tmp_path) in stderr_error_line(capsys.readouterr().err)
    assert listing(tmp_path) == before


def test_a_run_of_one_dimensional_features_draws_strips(tmp_path):
    """--feat-dim 1: train.png and test.png show the feature against the (jittered) class, for every
    --projection (nothing to project)."""
    assert main([*QUICK, "--feat-dim", "1", "--out", str(tmp_path), "--name", "run"]) == 0
    for name in ("train.png", "test.png"):
        assert Image.open(tmp_path / "run" / name).size == (900, 900)
    features, labels = torch.linspace(-1, 1, 40)[:, None], torch.arange(40) % 4
    for method in ("pca", "tsne"):
        path = tmp_path / f"{method}.png"
        images = torch.zeros(40, 1, 8, 8)
        visualize.save_projection(path, features, images, labels, "abcd", "t", method=method)
        assert np.asarray(Image.open(path))[..., :3].std() > 0


SECONDS = "is not a number of seconds from 0.01 to 600"
STITCHING = "is for stitching GIFs, which --geometry does not do"
# A frame time: zero, negative, NaN, infinite (ValueError, OverflowError in the GIF writer), below a
# GIF's hundredth of a second, beyond its 655 s, not a number; "=" keeps argparse from reading -inf as a flag.
TIMES = [("--duration", v) for v in "0 -1 nan inf -inf 1e400 700 0.001 abc".split()]
REFUSED = [
    ([f"{f}={v}"], f"argument {f}: '{v}' {SECONDS}") for f, v in [*TIMES, ("--last-pause", "0")]
]
REFUSED += [
    (["--geometry", "--out", "g.png", f, "1"], f"{f} {STITCHING}")
    for f in ("--duration", "--last-pause")
]
REFUSED += [
    (["--geometry", "--out", "g.png", "--imgs-dir", "imgs"], f"--imgs-dir {STITCHING}"),
    (["--geometry", "--out", "g.png", "--to-imgs"], f"--to-imgs {STITCHING}; drop it"),
    (["--imgs-dir", "imgs"], "--imgs-dir says where --to-imgs copies to; add --to-imgs or drop it"),
    (["--geometry"], "--geometry and --out go together"),
]


@pytest.mark.parametrize("argv, message", REFUSED)
def test_cli_refusals_exit_2_in_one_line_and_write_nothing(tmp_path, capsys, argv, message):
    """Every argument visualize.py refuses: exit 2, one line naming the flag, nothing written."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    before = listing(tmp_path)
    with pytest.raises(SystemExit) as info:
        visualize.main(
            [str(run_dir), *(str(tmp_path / a) if a in ("g.png", "imgs") else a for a in argv)]
        )
    assert info.value.code == 2
    assert message in stderr_error_line(capsys.readouterr().err)
    assert listing(tmp_path) == before


def test_cli_on_a_run_folder_it_cannot_write_is_one_line(tiny_runs, tmp_path, monkeypatch, capsys):
    """A read-only run folder (simulated at the rename, as root ignores chmod): exit 1, one line
    naming the GIF, no temporary file left, the old GIF whole."""
    run_dir = copy_run(tiny_runs["cent"], tmp_path)
    old = (run_dir / "train.gif").read_bytes()

    read_only = OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(utils.os, "replace", mock.Mock(side_effect=read_only))
    assert visualize.main([str(run_dir)]) == 1
    line = stderr_error_line(capsys.readouterr().err)
    want = f"error: cannot write {run_dir / 'train.gif'} (Read-only file system); free space or fix"
    assert line.startswith(want)
    assert (run_dir / "train.gif").read_bytes() == old and not list(run_dir.rglob("*.tmp"))


def test_to_imgs_replaces_a_link_instead_of_writing_through_it(tiny_runs, tmp_path):
    run_dir = copy_run(tiny_runs["cent"], tmp_path)
    precious = tmp_path / "precious.gif"
    precious.write_bytes(b"keep me")
    (tmp_path / "imgs" / "cent-mnist-feat=2").mkdir(parents=True)
    (tmp_path / "imgs" / "cent-mnist-feat=2" / "train.gif").symlink_to(precious)
    assert visualize.main([str(run_dir), "--to-imgs", "--imgs-dir", str(tmp_path / "imgs")]) == 0
    copied = tmp_path / "imgs" / "cent-mnist-feat=2" / "train.gif"
    assert precious.read_bytes() == b"keep me" and not copied.is_symlink()
    assert copied.read_bytes() == (run_dir / "train.gif").read_bytes()
