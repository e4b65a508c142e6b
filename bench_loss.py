"""Cost of the standalone center loss alone as the number of classes grows (face recognition has 10,000 to 100,000+).

    python bench_loss.py                                              # classes 10,1000,100000 x batches 128,1024, CPU
    python bench_loss.py --devices cpu,cuda --repeats 50 --json results/bench-loss.json

For every device, batch size m, number of classes C and center update (sgd: SGD with momentum on the
centers, the default; paper: the center loss paper's update), one loss step on random D-dimensional
features is timed in three phases: forward (losses.StandaloneCenterLoss), backward (to the features
and, with sgd, the centers) and the center update. Reported: the median over --repeats after --warmup
untimed steps, in ms, and for each update the ratio of the whole step's median at the most classes to
the fewest, at the smallest batch: `classes 100000 vs 10 at batch 128: ratio R` (sgd) and the same line
with `(paper)`. Features are a leaf tensor standing for a model's output; the model's cost is not
counted. The sgd step uses the sparse row gradient and center_sgd_step (losses.py), the paper
step paper_center_update; both touch only the batch's rows, so their cost should not grow with C.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from losses import StandaloneCenterLoss, center_rows_grad, center_sgd_step, paper_center_update

PHASES = ("forward", "backward", "center_update")


def parse_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--classes", type=parse_list, default=[10, 1000, 100_000], help="comma-separated numbers of classes")
    p.add_argument("--batches", type=parse_list, default=[128, 1024], help="comma-separated batch sizes")
    p.add_argument("--feat-dim", type=int, default=128)
    p.add_argument("--updates", default="sgd,paper", help="center updates to time: sgd, paper or both")
    p.add_argument("--devices", default="cpu,cuda", help="devices to time; cuda is skipped where there is none")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default=None, help="also write every median here")
    return p


def loss_step(num_classes: int, batch: int, feat_dim: int, update: str, device: torch.device) -> Callable[[], list[Callable[[], None]]]:
    """A function that prepares one step and returns its three phases as callables, run in order."""
    g = torch.Generator().manual_seed(0)
    criterion = StandaloneCenterLoss(num_classes, feat_dim, sparse=update == "sgd").to(device)
    centers = criterion.centers
    centers.requires_grad_(update == "sgd")
    momentum = torch.zeros_like(centers)
    features = torch.randn(batch, feat_dim, generator=g).to(device).requires_grad_()
    labels = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    finite = torch.ones((), dtype=torch.bool, device=device)
    state = {}

    def forward() -> None:
        state["loss"] = criterion(features, labels)

    def backward() -> None:
        features.grad = None
        state.pop("loss").backward()

    def center_update() -> None:
        if update == "sgd":
            center_sgd_step(centers.data, momentum, center_rows_grad(centers), 0.01, 0.9, finite)
        else:
            paper_center_update(centers.data, features.detach(), labels, 0.5, finite)

    return lambda: [forward, backward, center_update]


def time_step(step: Callable[[], list[Callable[[], None]]], repeats: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median ms of each phase and of the whole step over `repeats` steps after `warmup` untimed ones."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {p: [] for p in (*PHASES, "step")}
    for i in range(warmup + repeats):
        total = 0.0
        for name, phase in zip(PHASES, step()):
            sync()
            started = time.perf_counter()
            phase()
            sync()
            elapsed = (time.perf_counter() - started) * 1000
            total += elapsed
            if i >= warmup:
                times[name].append(elapsed)
        if i >= warmup:
            times["step"].append(total)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    devices = [torch.device(d) for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    updates = args.updates.split(",")
    results = []
    for device in devices:
        for update in updates:
            for batch in args.batches:
                for num_classes in args.classes:
                    medians = time_step(loss_step(num_classes, batch, args.feat_dim, update, device), args.repeats, args.warmup, device)
                    results.append({"device": str(device), "update": update, "batch": batch, "classes": num_classes, **medians})
                    print(
                        f"{device} {update} batch {batch} classes {num_classes}: "
                        + ", ".join(f"{name} {medians[name]:.2f} ms" for name in (*PHASES, "step")),
                        flush=True,
                    )
            few, many, batch = min(args.classes), max(args.classes), min(args.batches)
            step = {r["classes"]: r["step"] for r in results if (r["device"], r["update"], r["batch"]) == (str(device), update, batch)}
            suffix = "" if update == "sgd" else f" ({update})"
            print(f"{device}: classes {many} vs {few} at batch {batch}: ratio {step[many] / step[few]:.2f}{suffix}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"feat_dim": args.feat_dim, "repeats": args.repeats, "torch": torch.__version__, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
