"""Pictures of learned features: per-epoch 2-D frames, GIFs, projections of high-dimensional features.

    python visualize.py runs/standalone-mnist-feat=2 [RUN_DIR ...] [--to-imgs]     # frames/<split>/*.png -> <split>.gif
    python visualize.py --geometry RUN_DIR [RUN_DIR ...] --out docs/geometry.png  # metrics.GEOMETRY_METRICS over epochs

--to-imgs also copies the GIFs (and projections) to imgs/<loss>-<dataset>-feat=<d>/, the naming of the study's README."""

import argparse
import contextlib
import csv
import io
import json
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch

from metrics import GEOMETRY_METRICS
from utils import WriteError, atomic_write_bytes

try:
    import matplotlib.pyplot as plt

    plt.switch_backend("Agg")
except Exception as exc:  # e.g. OSError: no writable cache folder (umask 777, a read-only home)
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    raise SystemExit(
        f"error: matplotlib cannot be imported ({reason}); check its install and that MPLCONFIGDIR or the home folder is writable"
    ) from None

FRAME_SIZE_INCHES, FRAME_DPI = 5.0, 80
SPLITS = ("train", "test")
# More classes than this (face identities) get no legend: it would cover the frame.
LEGEND_CLASSES = 40
THUMBNAILS, MAX_POINTS = 300, 5000  # a projection's points drawn as their image, and all its points
PDIST_CENTERS = 2000  # 2 million distances, 8 MB


class StitchError(Exception):
    """A run whose pictures cannot be made (a damaged frame, args.json or metrics.csv, an unusable --imgs-dir); one line, exit code 1."""


def class_colors(num_classes: int) -> np.ndarray:
    """A fixed colour per class index (independent of the seed): tab10, tab20, then evenly spaced hues."""
    if num_classes <= 20:
        return plt.get_cmap("tab10" if num_classes <= 10 else "tab20")(np.arange(num_classes))
    return plt.get_cmap("hsv")(np.linspace(0, 1, num_classes, endpoint=False))


def save_bytes(path: Path, save) -> None:
    """save(buffer) in memory, then one atomic write: a kill mid-save leaves the old file."""
    buffer = io.BytesIO()
    save(buffer)
    atomic_write_bytes(path, buffer.getvalue())


def save_figure(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    save_bytes(path, partial(fig.savefig, format=Path(path).suffix[1:]))
    plt.close(fig)


def own_folder(run_dir: Path, *names: str) -> Path:
    """run_dir/names..., each made if missing; WriteError for a link or non-folder (the run's files would go elsewhere)."""
    folder = Path(run_dir)
    for name in names:
        folder = folder / name
        try:
            if not folder.is_symlink() and not folder.exists():
                folder.mkdir()
        except OSError as exc:
            raise WriteError(f"cannot create {folder} ({exc.strerror})") from None
        if folder.is_symlink() or not folder.is_dir():
            raise WriteError(f"{folder} is a link or not a folder; remove it")
    return folder


def robust_limits(points: np.ndarray, quantile: float = 0.005, pad: float = 0.08) -> np.ndarray:
    """Axis limits [[xmin, xmax], [ymin, ymax]] spanning all but the outer 0.5% on each side, padded."""
    low, high = np.quantile(points, [quantile, 1 - quantile], axis=0)
    span = np.maximum(high - low, 1e-6)
    return np.stack([low - pad * span, high + pad * span], axis=1)


def add_legend(ax: plt.Axes, colors: np.ndarray, classes: Sequence[str], marker: str, **kw) -> None:
    style = dict(marker=marker, linestyle="", markersize=kw.pop("markersize", 6))
    handles = [plt.Line2D([], [], color=colors[k], label=c, **style) for k, c in enumerate(classes)]
    ax.legend(handles=handles, loc="upper right", **kw)


def draw_frame(
    path: Path,
    features: np.ndarray,
    labels: np.ndarray,
    centers: np.ndarray | None,
    classes: Sequence[str],
    title: str,
    limits: np.ndarray,
) -> None:
    """One 2-D frame: points coloured by class, centers (if any) as black-edged stars, class names in the legend."""
    colors = class_colors(len(classes))
    fig, ax = plt.subplots(figsize=(FRAME_SIZE_INCHES, FRAME_SIZE_INCHES), dpi=FRAME_DPI)
    size = 2 if len(features) > 2000 else 6
    ax.scatter(*features.T, c=colors[labels], s=size, linewidths=0, rasterized=True)
    if centers is not None and len(centers):
        many = len(centers) > LEGEND_CLASSES
        star = dict(s=10, linewidths=0.2, rasterized=True) if many else dict(s=120, linewidths=0.8)
        ax.scatter(*centers.T, c=colors[: len(centers)], marker="*", edgecolors="black", **star)
    if len(classes) <= LEGEND_CLASSES:
        ncol = 1 if len(classes) <= 10 else 2
        add_legend(ax, colors, classes, "o", markersize=5, fontsize=6, framealpha=0.7, ncol=ncol)
    ax.set(xlim=limits[0], ylim=limits[1])
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=6)
    save_figure(fig, path)


def save_frame_data(
    run_dir: Path,
    split: str,
    epoch: int,
    features: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor | None,
    title: str,
) -> None:
    """Write frames/<split>/epoch_NNN.npz, the points of one frame; draw_frames draws them all at the end."""
    centers = centers.float().numpy() if centers is not None else np.zeros((0, 2), np.float32)
    path = own_folder(run_dir, "frames", split) / f"epoch_{epoch:03d}.npz"
    points = {"features": features.float().numpy(), "labels": labels.numpy(), "centers": centers}
    save_bytes(path, lambda buffer: np.savez(buffer, **points, title=title))


def load_frame(path: Path) -> dict[str, np.ndarray]:
    """One frame's arrays; a damaged file (cut short, not an .npz, a missing or malformed array) is a StitchError."""
    try:
        with np.load(path) as d:
            frame = {k: d[k] for k in ("features", "labels", "centers", "title")}
        features = frame["features"]
        if features.ndim != 2 or features.shape[1] != 2 or len(frame["labels"]) != len(features):
            raise ValueError("not 2-D points with one label each")
    except Exception as exc:  # numpy reports damage as OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, ...
        raise StitchError(f"{path}: damaged frame data ({type(exc).__name__}); delete it") from None
    return frame


def draw_frames(run_dir: Path, classes: Sequence[str]) -> np.ndarray | None:
    """Draw frames/*/epoch_*.npz -> .png in one axis range (returned) so GIFs do not jump.
    In this process (about 0.7 s per epoch here): a pool of drawing processes killed by a signal sent to the whole process
    group can die holding the pool's queue lock, and the parent then hangs in Pool.terminate()."""
    frames = sorted(f for s in SPLITS for f in own_folder(run_dir, "frames", s).glob("epoch_*.npz"))
    if not frames:
        return None
    loaded = [load_frame(f) for f in frames]
    ranges = [robust_limits(np.concatenate([d["features"], d["centers"]])) for d in loaded]
    limits = np.stack([np.min(ranges, 0)[:, 0], np.max(ranges, 0)[:, 1]], axis=1)
    for path, d in zip(frames, loaded):
        arrays = (d["features"], d["labels"], d["centers"])
        draw_frame(path.with_suffix(".png"), *arrays, classes, str(d["title"]), limits)
    return limits


def project_2d(features: torch.Tensor, method: str = "pca", seed: int = 0) -> np.ndarray:
    """2-D projection: PCA (top two principal components, by SVD) or t-SNE (scikit-learn)."""
    features = features.double()
    if method == "tsne":
        from sklearn.manifold import TSNE

        return TSNE(
            n_components=2, init="pca", random_state=seed, perplexity=min(30, len(features) - 1)
        ).fit_transform(features.numpy())
    centered = features - features.mean(0)
    _, _, v = torch.linalg.svd(centered, full_matrices=False)
    return (centered @ v[:2].T).numpy()


def save_projection(
    path: Path,
    features: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[str],
    title: str,
    method: str = "pca",
) -> None:
    """THUMBNAILS points as their image in a class-coloured frame, the rest (to MAX_POINTS) as dots; 1-D: x, class index ±0.3."""
    n = min(len(features), MAX_POINTS)
    labels = labels[:n].numpy()
    if features.shape[1] == 1:
        jitter = np.random.default_rng(0).uniform(-0.3, 0.3, n)
        points, method = np.stack([features[:n, 0].double().numpy(), labels + jitter], 1), "strip"
    else:
        points = project_2d(features[:n], method)
    colors = class_colors(len(classes))
    fig, ax = plt.subplots(figsize=(9, 9), dpi=100)
    ax.scatter(*points[THUMBNAILS:].T, c=colors[labels[THUMBNAILS:]], s=3, linewidths=0, alpha=0.6)
    limits = robust_limits(points, quantile=0.002)
    (dx, dy) = 0.015 * (limits[:, 1] - limits[:, 0])
    for k in range(min(THUMBNAILS, n)):
        # A grey image's one channel, thrice, in a frame of its class colour.
        thumb = images[k].float().div(255).permute(1, 2, 0).expand(-1, -1, 3).numpy()
        framed = np.ones((thumb.shape[0] + 4, thumb.shape[1] + 4, 3)) * colors[labels[k]][:3]
        framed[2:-2, 2:-2] = thumb
        extent = np.repeat(points[k], 2) + (-dx, dx, -dy, dy)  # x - dx, x + dx, y - dy, y + dy
        ax.imshow(framed, extent=extent, interpolation="nearest", zorder=3)
    add_legend(ax, colors, classes, "s", fontsize=8, framealpha=0.8)
    ax.set(xlim=limits[0], ylim=limits[1], aspect="auto")
    ax.set_title(f"{title}, {method.upper()} of {n} points", fontsize=10)
    save_figure(fig, path)


def log_tensorboard(
    writer, epoch: int, row: dict, centers: torch.Tensor | None, embedding: tuple | None = None
) -> None:
    """TensorBoard: each float metrics column, min/mean/max distance between centers, the embedding if given."""
    for key, value in row.items():
        if isinstance(value, float) and key not in ("epoch", "seconds"):
            group = "train/" if key.startswith("train_") else "eval/"
            writer.add_scalar(group + key, value, epoch)
    if centers is not None:
        # every pair once, of at most PDIST_CENTERS (a fixed sample: all of 100,000 would take 20 GB)
        sample = torch.randperm(len(centers), generator=torch.Generator().manual_seed(0))
        distances = torch.pdist(centers.detach()[sample[:PDIST_CENTERS].to(centers.device)].float())
        for name in ("min", "mean", "max"):
            writer.add_scalar(f"centers/{name}_distance", float(getattr(distances, name)()), epoch)
    if embedding is not None:
        features, images, names = embedding
        writer.add_embedding(features.cpu(), names, images.float().div(255), epoch, "test_features")
    writer.flush()


def read_frames(run_dir: Path, split: str) -> list[tuple[Path, np.ndarray]]:
    """(path, RGB array) of each frames/<split>/epoch_*.png, all of one size; a damaged one is a StitchError."""
    frames = []
    for frame in sorted((Path(run_dir) / "frames" / split).glob("epoch_*.png")):
        try:
            frames.append((frame, iio.imread(frame)[..., :3]))
        except Exception as exc:  # PIL reports damage as OSError, SyntaxError, ValueError, ...
            raise StitchError(f"{frame}: not readable as an image ({type(exc).__name__})") from None
        if frames[-1][1].shape != frames[0][1].shape:
            (h, w), (h0, w0) = frames[-1][1].shape[:2], frames[0][1].shape[:2]
            raise StitchError(f"{frame}: a {w}x{h} frame among {w0}x{h0} ones; delete it")
    return frames


def log_frames_to_tensorboard(run_dir: Path) -> None:
    """Every drawn test frame as the image "features/test" at its epoch's step, in the run's TensorBoard log."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(own_folder(run_dir, "tensorboard"))) as writer:
        for frame, image in read_frames(run_dir, "test"):
            writer.add_image("features/test", image, int(frame.stem[6:]), dataformats="HWC")


def make_run_gifs(run_dir: Path, duration: float = 0.4, last_pause: float = 2.0) -> list[Path]:
    """Make the looping <split>.gif of each frames/<split>/epoch_*.png, the last frame staying `last_pause` seconds."""
    made = []
    for split in SPLITS:
        if images := [image for _, image in read_frames(run_dir, split)]:
            durations = [int(duration * 1000)] * (len(images) - 1) + [int(last_pause * 1000)]
            # Pillow writes a lone frame by its single-frame path, which takes one duration, not a list.
            times = durations if len(images) > 1 else durations[0]
            gif = iio.imwrite("<bytes>", images, extension=".gif", duration=times, loop=0)
            made.append(Path(run_dir) / f"{split}.gif")
            atomic_write_bytes(made[-1], gif)
    return made


def stitch(run_dir: Path, duration: float, last_pause: float, imgs_dir: Path | None) -> None:
    """Make one run's GIFs and copy them (and projections) to imgs_dir/<loss>-<dataset>-feat=<d>/ if given (args.json)."""
    if not run_dir.is_dir():
        raise StitchError(f"{run_dir}: no such run folder")
    made = make_run_gifs(run_dir, duration, last_pause)
    for path in made:
        print(f"{path}: {len(list((run_dir / 'frames' / path.stem).glob('epoch_*.png')))} frames")
    projections = [p for p in (run_dir / f"{split}.png" for split in SPLITS) if p.is_file()]
    if not made and not projections:
        raise StitchError(f"{run_dir}: no frames; train with --feat-dim 2, without --no-plots")
    if imgs_dir is None:
        return
    path = run_dir / "args.json"
    try:
        saved = json.loads(path.read_text())
        label = f"{saved['loss']}-{saved['dataset']}-feat={int(saved['feat_dim'])}"
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
        raise StitchError(f"{path}: damaged ({type(exc).__name__}); copy GIFs by hand") from None
    if "/" in label or "\0" in label:
        raise StitchError(f"{path}: a / or NUL in its loss or dataset; copy GIFs by hand")
    target = imgs_dir / label
    try:
        target.mkdir(parents=True, exist_ok=True)
        for path in made + projections:  # atomic: replaces a link there, never writes through it
            atomic_write_bytes(target / path.name, path.read_bytes())
            print(f"copied {path} -> {target / path.name}")
    except OSError as exc:
        raise StitchError(f"--imgs-dir: cannot copy into {target} ({exc.strerror})") from None


def geometry_series(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Each GEOMETRY_METRICS column of metrics.csv as (epochs, values), less epochs (--eval-every) and columns without values."""
    path = Path(run_dir) / "metrics.csv"
    try:
        rows = list(csv.DictReader(path.read_text().splitlines()))
        series = {}
        for name in GEOMETRY_METRICS:  # an empty cell: an epoch without them
            if points := [(int(r["epoch"]), float(r[name])) for r in rows if r.get(name)]:
                series[name] = tuple(map(list, zip(*points)))
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, ValueError) as exc:
        raise StitchError(f"{path}: not readable ({type(exc).__name__}: {exc})") from None
    if not series:
        raise StitchError(f"{path}: none of the geometry columns; the run was made without them")
    return series


def draw_geometry(runs: list[Path], out: Path) -> None:
    """visualize.py --geometry: a panel per GEOMETRY_METRICS figure over epochs, a line per run (all read first)."""
    picture = out.suffix.lower() in (".png", ".svg", ".pdf")
    if not picture or out.is_dir() or not out.parent.is_dir():
        raise StitchError(f"--out {out}: give a .png, .svg or .pdf file in an existing folder")
    series = {str(run): geometry_series(run) for run in runs}
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), dpi=100)
    for ax, name in zip(axes.flat, GEOMETRY_METRICS):
        for label, run in series.items():
            if name in run:
                ax.plot(*run[name], marker="o", markersize=3, label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=7)
    save_figure(fig, out)
    print(f"{out}: {', '.join(GEOMETRY_METRICS)} of {len(runs)} run(s)")


def seconds(text: str) -> float:
    """A frame time for argparse: a finite number of seconds above zero (a GIF stores hundredths of a second in 16 bits)."""
    with contextlib.suppress(ValueError):
        if 0.01 <= float(text) <= 600:  # not NaN nor infinities
            return float(text)
    raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0.01 to 600")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Stitch runs' frames into train.gif and test.gif.")
    add = parser.add_argument
    add("runs", nargs="+", type=Path, help="run folders (runs/<name>)")
    add("--duration", type=seconds, help="seconds per frame (0.01 to 600; default 0.4)")
    add("--last-pause", type=seconds, help="seconds the last frame stays (0.01 to 600; default 2)")
    add("--to-imgs", action="store_true", help="copy GIFs, projections to imgs/<run name>/")
    add("--imgs-dir", type=Path, help="where --to-imgs copies to (default imgs)")
    add("--geometry", action="store_true", help="instead: plot the runs' class geometry by epoch")
    add("--out", type=Path, help="with --geometry: the picture to write (.png, .svg or .pdf)")
    args = parser.parse_args(argv)
    if args.geometry != (args.out is not None):
        parser.error("--geometry and --out go together: --geometry RUN_DIR ... --out geometry.png")
    stitching = ("duration", "last_pause", "to_imgs", "imgs_dir")
    given = [f"--{n.replace('_', '-')}" for n in stitching if getattr(args, n) not in (None, False)]
    if args.geometry and given:
        parser.error(f"{given[0]} is for stitching GIFs, which --geometry does not do; drop it")
    if args.imgs_dir is not None and not args.to_imgs:
        parser.error("--imgs-dir says where --to-imgs copies to; add --to-imgs or drop it")
    imgs_dir = (args.imgs_dir or Path("imgs")) if args.to_imgs else None
    times = (args.duration or 0.4, args.last_pause or 2.0)
    jobs = [partial(stitch, run, *times, imgs_dir) for run in args.runs]
    failures = 0
    for job in [partial(draw_geometry, args.runs, args.out)] if args.geometry else jobs:
        try:
            job()
        except (StitchError, WriteError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
