"""The command line of main.py: every flag with its default, the study's settings and the first
run's, and the checks that turn a bad argument into one line and exit code 2."""

import argparse
import importlib.util
import math
import os
from functools import partial

import torch

from batches import default_workers
from checkpoints import NAME_MAX, RUN_DIR_MAX, out_problem
from datasets import DATASETS, canonical_name
from distributed import world_size
from losses import CENTER_UPDATES, LOSSES, PAPER_UPDATE_LOSSES
from models import MODELS
from training import AMP_DTYPES, MODEL_RECIPES
from utils import resolve_device

DESCRIPTION = (
    "Train a CNN with softmax (xent), softmax + center loss (cent) or the standalone center loss."
)
STUDY = {"epochs": 100, "batch_size": 128, "patience": 10}
# digits, the offline first run: 1,437 train images of 16x16 (datasets.DIGITS_SIDE). More, smaller
# batches and a shorter patience reach test acc 0.97 in about a minute on a 2-core laptop CPU.
# One thread: on a 2-core machine shared with other jobs, two threads wait on each other at every op
# (1006 and 1234 s against 90 and 185 s); alone, one is within 6% of two (results/first-run/threads/).
FIRST_RUN = {"epochs": 20, "batch_size": 64, "patience": 3, "threads": 1}


# numpy's limit (np.random.seed). The torch generators take seed * 1_000_003 + epoch (utils.epoch_generator),
# on the loader path times the torchrun world size: below their 2**64 - 1 for up to 4,294 processes.
MAX_SEED = 2**32 - 1
# A loss weight beyond this scales the gradients past what float32 weights can take within a few
# steps: the run would "train" on absurd losses (1e30 went through as finite steps) and learn nothing.
MAX_WEIGHT = 1e6
# The flags only some losses use, with those losses: giving one to another loss is refused (it would do nothing).
LOSS_FLAGS = {
    "weight_cent": ("cent",),
    "weight_intra": ("standalone", "centers-apart"),
    "weight_inter": ("standalone", "centers-apart"),
    "inter_margin": ("standalone",),
    "alpha": ("centers-apart",),
    "lr_cent": tuple(loss for loss in LOSSES if loss != "xent"),  # the losses with centers
}
LOSS_DEFAULTS = {"weight_cent": 1.0, "weight_intra": 1.0, "weight_inter": 0.1, "alpha": 0.05}
# Set after the checks, which refuse them given where nothing is drawn.
PLOT_DEFAULTS = {"projection": "pca", "plot_every": 1}
FLOAT32 = torch.finfo(torch.float32)


def finite_float(text: str) -> float:
    """argparse type of every float flag: 0 or tiny <= |value| <= max of float32, in which training computes. NaN would slip
    through the range checks; infinity, 0 or subnormal in float32 poison training silently (--lr 1e-300 ended "done")."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    if value and not FLOAT32.tiny <= abs(value) <= FLOAT32.max:
        raise argparse.ArgumentTypeError(
            f"{text!r} is outside float32's normal range, {FLOAT32.tiny:.3g} to {FLOAT32.max:.3g} in size"
        )
    return value


class Parser(argparse.ArgumentParser):
    """Writes each default into its flag's help, except None ones whose help already says what happens."""

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        if action.help and action.default not in (None, argparse.SUPPRESS):
            action.help += " (default: %(default)s)"
        return action


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=DESCRIPTION)
    add = p.add_argument
    real = partial(add, type=finite_float)  # every float flag: finite, in float32's range
    whole = partial(add, type=int)
    switch = partial(add, action="store_true")

    add("--loss", choices=LOSSES, default="standalone", help="objective")
    add("--dataset", type=canonical_name, choices=DATASETS, default="digits", help="also cifar-10")
    add("--data-dir", help="data set folder: torchvision layout or train/ test/ (default ./data)")
    add("--model", choices=MODELS, default="resnet", help="resnet (the study's), lenet++ (paper's)")
    whole("--feat-dim", default=2, help="feature dimension")
    whole("--width", default=1, help="resnet: multiply every channel count (1: the study's)")
    whole("--epochs", help="default 100, the study's (20 for digits: a first run of a minute)")
    add("--train-classes", help="open set: train on these (0,2,5, 0-4, names), retrieval on others")
    whole("--train-samples", help="train on the first N train samples only (default all)")
    whole("--batch-size", help="global, split over torchrun processes (default 128; 64 for digits)")
    real("--lr", default=0.01, help="SGD learning rate of the model")
    real("--lr-cent", help="SGD learning rate of the centers (default --lr; SGD centers only)")
    real("--momentum", default=0.9, help="SGD momentum (model and SGD centers)")
    real("--weight-decay", help="SGD weight decay of the model (default 5e-4 lenet++, 0 resnet)")
    real("--clip-grad-norm", help="clip the gradient norm, 0: off (default 10 lenet++, 0 resnet)")
    add(
        "--center-update",
        choices=CENTER_UPDATES,
        default="sgd",
        help="sgd: by their gradient; paper: toward each class's batch mean (Wen et al., eq. 4)",
    )
    real("--center-alpha", help="center rate of --center-update paper (default 0.5, the paper's)")
    real("--weight-cent", help="weight of the center term in cent (default 1)")
    real("--weight-intra", help="intra term's weight: standalone, centers-apart (default 1)")
    real("--weight-inter", help="inter term's weight: standalone, centers-apart (default 0.1)")
    real("--inter-margin", help="standalone: truncate the inter term's squared distances (off)")
    real("--alpha", help="centers-apart: scale of the squared distance in exp() (default 0.05)")
    real("--val-fraction", default=0.0, help="train fraction held out to schedule and select on")
    whole("--eval-every", default=10, help="retrieval, clustering metrics every N epochs, the last")
    switch("--tensorboard", help="also log to <run folder>/tensorboard (needs tensorboard)")
    real("--factor", default=0.2, help="ReduceLROnPlateau factor (on test accuracy)")
    whole("--patience", help="ReduceLROnPlateau patience (default 10, the study's; 3 for digits)")
    real("--threshold", default=0.1, help="ReduceLROnPlateau relative threshold")
    whole("--seed", default=0, help=f"seed of weights, data order, augmentation: 0 to {MAX_SEED}")
    add("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    whole("--threads", help="CPU threads of torch's ops (default 1 for digits, else one per core)")
    add(
        "--pipeline",
        choices=("fast", "loader"),
        default="fast",
        help="fast: data on the device, batched augmentation; loader: torchvision DataLoader",
    )
    whole("--workers", help=f"DataLoader workers (default {default_workers()}: CPUs, at most 4)")
    add("--amp", choices=tuple(AMP_DTYPES), default="off", help="autocast precision")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="NHWC layout")
    # torch.compile's modes; reduce-overhead: CUDA graphs (not with --pipeline loader)
    modes = ("default", "reduce-overhead", "max-autotune")
    compiled = "torch.compile the model, in this mode (default: default)"
    add("--compile", nargs="?", const="default", choices=modes, help=compiled)
    whole("--max-bad-steps", default=5, help="stop after this many non-finite (skipped) steps")
    add("--out", default="runs", help="folder of run folders")
    add("--name", help="run folder name (default <loss>-<dataset>-feat=<feat_dim>)")
    switch("--resume", help="require a checkpoint to resume from (unfinished runs resume anyway)")
    switch("--overwrite", help="replace a finished or unfinished run of the same name")
    switch("--no-plots", help="skip the per-epoch 2-D frames and the final projections")
    add("--projection", choices=("pca", "tsne"), help="2-D view of final features (default pca)")
    whole("--plot-every", help="draw a 2-D frame every N epochs and the last (default 1)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = a = p.parse_args(argv)  # a: short, so that most checks fit on a line
    first = FIRST_RUN if a.dataset == "digits" else STUDY
    fill(a, {**first, **MODEL_RECIPES[a.model], "name": f"{a.loss}-{a.dataset}-feat={a.feat_dim}"})
    try:
        world = world_size()
    except ValueError as exc:
        p.error(str(exc))
    paper = a.center_update == "paper"
    centers = "has no centers" if a.loss == "xent" else "moves its centers by terms of its own"
    paper_loss = f"--center-update paper needs --loss cent or standalone ({a.loss} {centers})"
    weights = [w for w in (a.weight_cent, a.weight_intra, a.weight_inter) if w is not None]
    # one path component: the run folder must lie directly under --out (and --overwrite delete only it)
    plain = a.name not in ("", ".", "..") and not set(a.name) & {"/", os.sep, os.altsep, "\0"}
    name_bytes = len(os.fsencode(a.name))
    path_bytes = len(os.fsencode(os.path.abspath(os.path.join(a.out, a.name))))
    # flags given where nothing reads them, each with what it is for
    unused = {
        "width": (a.model == "resnet", "multiplies the resnet's channels"),
        "center_alpha": (paper, "is for --center-update paper"),
        "workers": (a.pipeline == "loader", "sets the DataLoader processes of --pipeline loader"),
        "plot_every": (a.feat_dim == 2 and not a.no_plots, "is for --feat-dim 2 with plots"),
        "projection": (a.feat_dim > 2 and not a.no_plots, "is for --feat-dim 3 or more with plots"),
        "data_dir": (
            a.dataset != "digits",
            "is not read by --dataset digits (bundled with scikit-learn)",
        ),
    }
    for key, losses in LOSS_FLAGS.items():
        users = "--loss " + " and ".join(losses)
        if key == "lr_cent":
            users = "every loss but xent (the losses with centers)"
        unused[key] = (a.loss in losses, f"is used by {users}, not by --loss {a.loss}")
    checks = [
        (0 <= a.seed <= MAX_SEED, f"--seed must be an integer from 0 to {MAX_SEED}"),
        (plain, f"--name {a.name!r} must be one plain folder name (no /, . or ..)"),
        (a.name == a.name.strip(), f"--name {a.name!r} starts or ends with whitespace"),
        (name_bytes <= NAME_MAX, f"--name is {name_bytes} bytes, over a file name's {NAME_MAX}"),
        (path_bytes <= RUN_DIR_MAX, f"--out and --name make a path over {RUN_DIR_MAX} bytes"),
        (not (a.resume and a.overwrite), "--resume continues a run and --overwrite deletes it"),
        (a.feat_dim >= 1, "--feat-dim must be at least 1"),
        (1 <= a.width <= 64, "--width must be an integer from 1 to 64"),
        (a.epochs >= 1, "--epochs must be at least 1"),
        (a.train_samples is None or a.train_samples >= 2, "--train-samples must be at least 2"),
        (a.batch_size >= 2, "--batch-size must be at least 2 (the losses compare samples)"),
        (a.lr > 0, "--lr must be positive"),
        (a.lr_cent is None or a.lr_cent >= 0, "--lr-cent must not be negative"),
        (0 <= a.momentum < 1, "--momentum must be in [0, 1)"),
        (a.weight_decay >= 0, "--weight-decay must not be negative"),
        (a.clip_grad_norm >= 0, "--clip-grad-norm must not be negative (0 turns clipping off)"),
        (not paper or a.loss in PAPER_UPDATE_LOSSES, paper_loss),
        (a.center_alpha is None or 0 < a.center_alpha <= 1, "--center-alpha must be in (0, 1]"),
        (a.lr_cent is None or not paper, "--lr-cent is for SGD centers; use --center-alpha"),
        (all(0 <= w <= MAX_WEIGHT for w in weights), f"loss weights must be 0 to {MAX_WEIGHT:g}"),
        (a.inter_margin is None or a.inter_margin > 0, "--inter-margin must be positive"),
        (0 < a.factor < 1, "--factor must be in (0, 1)"),
        (a.patience >= 0 and a.threshold >= 0, "--patience and --threshold must not be negative"),
        (a.workers is None or a.workers >= 0, "--workers must not be negative"),
        (a.max_bad_steps >= 1, "--max-bad-steps must be at least 1"),
        (a.plot_every is None or a.plot_every >= 1, "--plot-every must be at least 1"),
        (0 <= a.val_fraction < 1, "--val-fraction must be in [0, 1)"),
        (a.eval_every >= 0, "--eval-every must not be negative"),
        (a.threads is None or a.threads >= 1, "--threads must be at least 1"),
        (a.alpha is None or a.alpha > 0, "--alpha must be positive"),
        (
            a.batch_size % world == 0,
            f"--batch-size {a.batch_size} must be a multiple of the {world} processes (it is the global batch)",
        ),
        (
            a.data_dir != "",
            "--data-dir is empty; give the data set's folder, or drop the flag for ./data",
        ),
        (
            not a.data_dir or os.path.isdir(a.data_dir),
            f"--data-dir {a.data_dir} does not exist or is not a folder",
        ),
        (
            a.dataset != "folder" or a.data_dir is not None,
            "--dataset folder needs --data-dir DIR with DIR/train/<class>/* and DIR/test/<class>/*",
        ),
        *[
            (used or getattr(a, k) == p.get_default(k), f"--{k.replace('_', '-')} {what}; drop it")
            for k, (used, what) in unused.items()
        ],
        (
            (a.weight_intra, a.weight_inter) != (0, 0),  # another loss has refused them above
            f"--weight-intra 0 and --weight-inter 0 make the {a.loss} loss zero whatever the model does; give one a positive weight",
        ),
        *[(not problem, problem) for problem in (device_problem(a.device), out_problem(a.out))],
        (
            a.compile != "reduce-overhead" or a.pipeline == "fast",
            "--compile reduce-overhead captures CUDA graphs, which the DataLoader's pin-memory thread can break; use --pipeline fast",
        ),
        (
            not a.tensorboard or importlib.util.find_spec("tensorboard"),
            "--tensorboard needs the tensorboard package: pip install tensorboard",
        ),
    ]
    for ok, message in checks:
        if not ok:
            p.error(message)
    fill(a, {**LOSS_DEFAULTS, **PLOT_DEFAULTS, "workers": default_workers()})
    fill(a, {"center_alpha": 0.5} if paper else {"lr_cent": a.lr})  # 0.5: the paper's
    return args


def fill(args: argparse.Namespace, defaults: dict) -> None:
    """Set each flag of `defaults` that args leaves None."""
    vars(args).update({key: value for key, value in defaults.items() if getattr(args, key) is None})


def device_problem(name: str) -> str | None:
    """Why --device cannot train here, or None: a CPU or an available CUDA device (MPS is refused)."""
    try:
        device = resolve_device(name)
    except ValueError as exc:  # cuda:N under torchrun
        return str(exc)
    except RuntimeError:
        return f"--device {name}: not a device torch knows (try auto, cpu or cuda)"
    if device.type == "cpu":
        return None
    # GradScaler's step fails before torch ~2.8; its fused SGD applied non-finite steps
    if device.type == "mps":
        return f"--device {name}: MPS is not supported (its mixed-precision step is unsafe on some torch versions allowed); use --device cpu"
    if device.type != "cuda":
        return f"--device {name}: not a device to train on (use auto, cpu, cuda or cuda:N)"
    if not torch.cuda.is_available():
        return f"--device {name}: CUDA is not available here; use --device cpu"
    if device.index is not None and device.index >= (count := torch.cuda.device_count()):
        by_rank = "LOCAL_RANK" in os.environ and ":" not in name
        picked = f"cuda:{device.index} (by LOCAL_RANK)" if by_rank else name
        return f"--device {picked}: the CUDA devices here are cuda:0 to cuda:{count - 1}"
    return None
