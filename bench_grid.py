"""How long would the study's grid (18 runs of 100 epochs) take on this machine? Timed, not guessed.

    python bench_grid.py --data-dir ../shared/data --jobs 6                 # the whole grid, 6 runs at once
    python bench_grid.py --data-dir DIR --jobs 4 --datasets mnist -- --amp bf16   # a slice; flags after -- go to main.py

Runs reproduce.sh twice over the grid into fresh folders, at --short epochs and at --long epochs
(default 1 and 3), with --jobs runs at once, and times each sweep (wall clock: start-up, data
loading, training, evaluation, frames, the final pictures). The difference is what the extra
epochs cost the whole grid:

    per_epoch = (T_long - T_short) / (long - short)
    T(E) ~ T_short + (E - short) * per_epoch                                   (lower estimate)

Every run computes the retrieval and clustering metrics at its last epoch, and a 100-epoch run also
every --eval-every (10) epochs before; each extra round costs at most what a whole short sweep does,
so T_short + (E - short) * per_epoch + (E / 10 - 1) * T_short is an upper estimate. Both are printed and
written to --json with the two sweeps' times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default="data", help="folder with the data sets (as for main.py)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (reproduce.sh's JOBS)")
    p.add_argument("--short", type=int, default=1, help="epochs of the first sweep")
    p.add_argument("--long", type=int, default=3, help="epochs of the second sweep")
    p.add_argument("--epochs", type=int, default=100, help="the budget to estimate")
    p.add_argument("--eval-every", type=int, default=10, help="main.py's --eval-every in the budget to estimate")
    p.add_argument("--losses", default="xent cent standalone")
    p.add_argument("--datasets", default="mnist fashion-mnist cifar10")
    p.add_argument("--feat-dims", default="2 128")
    p.add_argument("--out", default="runs-bench-grid", help="the sweeps' run folders go here (replaced)")
    p.add_argument("--json", default="bench-grid.json")
    p.add_argument("main_args", nargs="*", help="flags for every main.py run, after --")
    args = p.parse_args(argv)
    if args.jobs < 1 or not 1 <= args.short < args.long <= args.epochs or args.eval_every < 0:
        p.error("--jobs must be at least 1 and 1 <= --short < --long <= --epochs, --eval-every not negative")
    if not Path(args.data_dir).is_dir():
        p.error(f"--data-dir {args.data_dir} does not exist or is not a folder")
    return args


def sweep(args: argparse.Namespace, epochs: int) -> float:
    """Wall-clock seconds of reproduce.sh over the grid at `epochs` epochs, in a fresh folder."""
    out = Path(args.out).resolve() / f"epochs={epochs}"
    shutil.rmtree(out, ignore_errors=True)
    env = os.environ | {
        "DATA_DIR": str(Path(args.data_dir).resolve()),
        "EPOCHS": str(epochs),
        "OUT": str(out),
        "JOBS": str(args.jobs),
        "LOSSES": args.losses,
        "DATASETS": args.datasets,
        "FEAT_DIMS": args.feat_dims,
        "PYTHON": sys.executable,
    }
    print(f"sweep at {epochs} epoch(s), {args.jobs} at once -> {out}", flush=True)
    started = time.perf_counter()
    result = subprocess.run(["bash", str(REPO / "reproduce.sh"), *args.main_args], env=env, cwd=REPO)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"bench_grid.py: error: the sweep at {epochs} epoch(s) failed; see the logs in {out}")
    print(f"  {seconds:.1f} s", flush=True)
    return seconds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = len(args.losses.split()) * len(args.datasets.split()) * len(args.feat_dims.split())
    short, long = sweep(args, args.short), sweep(args, args.long)
    per_epoch = (long - short) / (args.long - args.short)
    lower = short + (args.epochs - args.short) * per_epoch
    metric_rounds = max(args.epochs // args.eval_every - 1, 0) if args.eval_every else 0
    upper = lower + metric_rounds * short
    report = {
        "runs": runs,
        "jobs": args.jobs,
        "main_args": args.main_args,
        "sweep_seconds": {str(args.short): short, str(args.long): long},
        "grid_seconds_per_epoch": per_epoch,
        "estimate_epochs": args.epochs,
        "estimate_seconds_lower": lower,
        "estimate_seconds_upper": upper,
    }
    print(
        f"{runs} runs, {args.jobs} at once: {args.short} epoch(s) {short:.0f} s, {args.long} epochs {long:.0f} s, "
        f"{per_epoch:.1f} s per extra epoch of the whole grid; {args.epochs} epochs: "
        f"{lower / 60:.1f} to {upper / 60:.1f} minutes"
    )
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
