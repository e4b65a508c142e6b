"""Pictures of learned features: per-epoch 2-D frames, GIFs, projections of high-dimensional features.

    python visualize.py runs/standalone-mnist-feat=2 [RUN_DIR ...] [--to-imgs]

stitches each run's frames/train/*.png and frames/test/*.png into train.gif and test.gif in the run
folder; --to-imgs also copies them (and the projections of runs with feat_dim > 2) to
imgs/<loss>-<dataset>-feat=<d>/, the naming the study's README uses.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

FRAME_SIZE_INCHES = 5.0
FRAME_DPI = 80
SPLITS = ("train", "test")
LEGEND_CLASSES = 40  # more classes than this (face identities) get no legend: it would cover the frame


def class_colors(num_classes: int) -> np.ndarray:
    """A fixed colour per class index (independent of the seed): tab10, tab20, then evenly spaced hues."""
    if num_classes <= 10:
        return plt.get_cmap("tab10")(np.arange(num_classes))
    if num_classes <= 20:
        return plt.get_cmap("tab20")(np.arange(num_classes))
    return plt.get_cmap("hsv")(np.linspace(0, 1, num_classes, endpoint=False))


def robust_limits(points: np.ndarray, quantile: float = 0.005, pad: float = 0.08) -> np.ndarray:
    """Axis limits [[xmin, xmax], [ymin, ymax]] spanning all but the outer 0.5% on each side, padded."""
    low = np.quantile(points, quantile, axis=0)
    high = np.quantile(points, 1 - quantile, axis=0)
    span = np.maximum(high - low, 1e-6)
    return np.stack([low - pad * span, high + pad * span], axis=1)


def draw_frame(
    path: Path,
    features: np.ndarray,
    labels: np.ndarray,
    centers: np.ndarray | None,
    classes: Sequence[str],
    title: str,
    limits: np.ndarray,
) -> None:
    """One 2-D frame: points coloured by class, centers as black-edged stars, class names in the legend."""
    colors = class_colors(len(classes))
    fig, ax = plt.subplots(figsize=(FRAME_SIZE_INCHES, FRAME_SIZE_INCHES), dpi=FRAME_DPI)
    ax.scatter(features[:, 0], features[:, 1], c=colors[labels], s=2 if len(features) > 2000 else 6, linewidths=0, rasterized=True)
    if centers is not None:
        many = len(centers) > LEGEND_CLASSES
        ax.scatter(
            centers[:, 0],
            centers[:, 1],
            c=colors[: len(centers)],
            s=10 if many else 120,
            marker="*",
            edgecolors="black",
            linewidths=0.2 if many else 0.8,
            rasterized=many,
        )
    if len(classes) <= LEGEND_CLASSES:
        handles = [
            plt.Line2D([], [], marker="o", linestyle="", color=colors[k], markersize=5, label=name) for k, name in enumerate(classes)
        ]
        ax.legend(handles=handles, loc="upper right", fontsize=6, framealpha=0.7, ncol=1 if len(classes) <= 10 else 2)
    ax.set_xlim(*limits[0])
    ax.set_ylim(*limits[1])
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_frame(
    run_dir: Path,
    split: str,
    epoch: int,
    features: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor | None,
    classes: Sequence[str],
    title: str,
) -> Path:
    """Write frames/<split>/epoch_NNN.png and the .npz it was drawn from (for the final redraw)."""
    folder = Path(run_dir) / "frames" / split
    folder.mkdir(parents=True, exist_ok=True)
    features, labels = features.float().numpy(), labels.numpy()
    centers = centers.float().numpy() if centers is not None else np.zeros((0, 2), np.float32)
    np.savez(folder / f"epoch_{epoch:03d}.npz", features=features, labels=labels, centers=centers, title=title)
    limits = robust_limits(np.concatenate([features, centers]))
    png = folder / f"epoch_{epoch:03d}.png"
    draw_frame(png, features, labels, centers if len(centers) else None, classes, title, limits)
    return png


def redraw_frames(run_dir: Path, classes: Sequence[str]) -> np.ndarray | None:
    """Redraw every frame of a run with one axis range (the union of each frame's robust range) so
    the animation does not jump. Returns the limits used."""
    frames = sorted((Path(run_dir) / "frames").glob("*/epoch_*.npz"))
    if not frames:
        return None
    loaded = [np.load(f) for f in frames]
    ranges = np.stack([robust_limits(np.concatenate([d["features"], d["centers"]])) for d in loaded])
    limits = np.stack([ranges[:, :, 0].min(0), ranges[:, :, 1].max(0)], axis=1)
    for f, d in zip(frames, loaded):
        centers = d["centers"] if len(d["centers"]) else None
        draw_frame(f.with_suffix(".png"), d["features"], d["labels"], centers, classes, str(d["title"]), limits)
    return limits


def project_2d(features: torch.Tensor, method: str = "pca", seed: int = 0) -> np.ndarray:
    """2-D projection: PCA (top two principal components, by SVD) or t-SNE (scikit-learn)."""
    features = features.double()
    if method == "tsne":
        from sklearn.manifold import TSNE

        return TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30, len(features) - 1)).fit_transform(features.numpy())
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
    thumbnails: int = 300,
    max_points: int = 5000,
) -> None:
    """Projection of high-dimensional features: `thumbnails` points drawn as their own image (with a
    class-coloured frame), the rest (up to max_points) as class-coloured dots."""
    n = min(len(features), max_points)
    points = project_2d(features[:n], method)
    labels = labels[:n].numpy()
    colors = class_colors(len(classes))
    fig, ax = plt.subplots(figsize=(9, 9), dpi=100)
    ax.scatter(points[thumbnails:, 0], points[thumbnails:, 1], c=colors[labels[thumbnails:]], s=3, linewidths=0, alpha=0.6)
    limits = robust_limits(points, quantile=0.002)
    side = 0.015 * (limits[:, 1] - limits[:, 0])
    for k in range(min(thumbnails, n)):
        thumb = images[k].float().div(255).permute(1, 2, 0).numpy()
        thumb = np.repeat(thumb, 3, axis=2) if thumb.shape[2] == 1 else thumb
        framed = np.ones((thumb.shape[0] + 4, thumb.shape[1] + 4, 3)) * colors[labels[k]][:3]
        framed[2:-2, 2:-2] = thumb
        x, y = points[k]
        ax.imshow(framed, extent=(x - side[0], x + side[0], y - side[1], y + side[1]), interpolation="nearest", zorder=3)
    handles = [plt.Line2D([], [], marker="s", linestyle="", color=colors[k], label=name) for k, name in enumerate(classes)]
    ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.8)
    ax.set_xlim(*limits[0])
    ax.set_ylim(*limits[1])
    ax.set_aspect("auto")
    ax.set_title(f"{title}, {method.upper()} of {n} points", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def log_tensorboard(
    writer,
    epoch: int,
    row: dict,
    centers: torch.Tensor | None,
    frame: Path,
    embedding: tuple[torch.Tensor, torch.Tensor, list[str]] | None = None,
) -> None:
    """TensorBoard: every numeric metrics column as a scalar, the min/mean/max distance between
    centers, the 2-D frame if one was drawn and, when given, (features, images, class names) as an
    embedding with image thumbnails."""
    for key, value in row.items():
        if isinstance(value, float) and key not in ("epoch", "seconds"):
            writer.add_scalar(("train/" if key.startswith("train_") else "eval/") + key, value, epoch)
    if centers is not None:
        centers = centers.detach().float()
        distances = torch.cdist(centers, centers)[~torch.eye(len(centers), dtype=torch.bool, device=centers.device)]
        for name, value in (("min", distances.min()), ("mean", distances.mean()), ("max", distances.max())):
            writer.add_scalar(f"centers/{name}_distance", float(value), epoch)
    if frame.is_file():
        import imageio.v3 as iio

        writer.add_image("features/test", iio.imread(frame)[..., :3], epoch, dataformats="HWC")
    if embedding is not None:
        features, images, names = embedding
        writer.add_embedding(features.cpu(), metadata=names, label_img=images.float().div(255), global_step=epoch, tag="test_features")
    writer.flush()


class StitchError(Exception):
    """A run whose GIFs cannot be made (a damaged frame or args.json, an unusable --imgs-dir); one line, exit code 1."""


def make_gif(frames: Sequence[Path], path: Path, duration: float = 0.4, last_pause: float = 2.0) -> None:
    """Stitch PNG frames into a looping GIF; the last frame stays `last_pause` seconds."""
    import imageio.v3 as iio

    images = []
    for frame in frames:
        try:
            images.append(iio.imread(frame)[..., :3])
        except Exception as exc:  # PIL reports damage as OSError, SyntaxError, ValueError, ...
            raise StitchError(f"{frame}: cannot be read as an image ({type(exc).__name__}); delete it to stitch the other frames") from None
        if images[-1].shape != images[0].shape:
            raise StitchError(
                f"{frame}: a {images[-1].shape[1]}x{images[-1].shape[0]} frame among {images[0].shape[1]}x{images[0].shape[0]} ones; delete it"
            )
    durations = [int(duration * 1000)] * (len(images) - 1) + [int(last_pause * 1000)]
    # Pillow writes a lone frame by its single-frame path, which takes one duration, not a list.
    iio.imwrite(path, images, extension=".gif", duration=durations if len(images) > 1 else durations[0], loop=0)


def make_run_gifs(run_dir: Path, duration: float = 0.4, last_pause: float = 2.0) -> list[Path]:
    """train.gif and test.gif in the run folder from its frames/<split>/epoch_*.png; returns the GIFs made."""
    made = []
    for split in SPLITS:
        frames = sorted((run_dir / "frames" / split).glob("epoch_*.png"))
        if frames:
            make_gif(frames, run_dir / f"{split}.gif", duration, last_pause)
            made.append(run_dir / f"{split}.gif")
    return made


def run_label(run_dir: Path) -> str:
    """<loss>-<dataset>-feat=<d> from the run's args.json (the study's imgs/ naming)."""
    path = Path(run_dir) / "args.json"
    try:
        args = json.loads(path.read_text())
        label = f"{args['loss']}-{args['dataset']}-feat={int(args['feat_dim'])}"
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
        raise StitchError(f"{path}: damaged ({type(exc).__name__}), so the imgs/ name is unknown; copy the GIFs by hand") from None
    if "/" in label or "\0" in label:
        raise StitchError(f"{path}: its loss or dataset holds a / or NUL, so it names no imgs/ folder; copy the GIFs by hand")
    return label


def stitch_run(run_dir: Path, duration: float, last_pause: float, imgs_dir: Path | None) -> str | None:
    """Make train.gif and test.gif of one run; returns an error line, or None when it worked."""
    try:
        stitch(Path(run_dir), duration, last_pause, imgs_dir)
    except StitchError as exc:
        return str(exc)
    return None


def stitch(run_dir: Path, duration: float, last_pause: float, imgs_dir: Path | None) -> None:
    """stitch_run's work; a problem is a StitchError."""
    if not run_dir.is_dir():
        raise StitchError(f"{run_dir}: no such run folder")
    made = make_run_gifs(run_dir, duration, last_pause)
    for path in made:
        print(f"{path}: {len(list((run_dir / 'frames' / path.stem).glob('epoch_*.png')))} frames")
    projections = [run_dir / f"{split}.png" for split in SPLITS if (run_dir / f"{split}.png").is_file()]
    if not made and not projections:
        raise StitchError(f"{run_dir}: no frames (frames/train/epoch_*.png) to stitch; train with --feat-dim 2 and without --no-plots")
    if imgs_dir is None:
        return
    if not (run_dir / "args.json").is_file():
        raise StitchError(f"{run_dir}: no args.json, so the imgs/ name is unknown")
    target = imgs_dir / run_label(run_dir)
    try:
        target.mkdir(parents=True, exist_ok=True)
        for path in made + projections:
            shutil.copyfile(path, target / path.name)
            print(f"copied {path} -> {target / path.name}")
    except OSError as exc:
        raise StitchError(f"--imgs-dir {imgs_dir}: cannot copy into {target} ({exc.strerror}); give a folder as --imgs-dir") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Stitch the per-epoch frames of runs into train.gif and test.gif.")
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (runs/<name>)")
    parser.add_argument("--duration", type=float, default=0.4, help="seconds per frame")
    parser.add_argument("--last-pause", type=float, default=2.0, help="seconds the last frame stays")
    parser.add_argument("--to-imgs", action="store_true", help="copy the GIFs and projections to imgs/<loss>-<dataset>-feat=<d>/")
    parser.add_argument("--imgs-dir", type=Path, default=Path("imgs"), help="where --to-imgs copies to")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.last_pause <= 0:
        parser.error("--duration and --last-pause must be positive")
    failures = 0
    for run_dir in args.runs:
        error = stitch_run(run_dir, args.duration, args.last_pause, args.imgs_dir if args.to_imgs else None)
        if error:
            print(f"error: {error}", file=sys.stderr)
            failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
