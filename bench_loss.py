"""Cost of the standalone center loss alone as the number of classes grows (face recognition has 10,000 to 100,000+).

    python bench_loss.py --json results/bench-loss/run.json   # classes 10,1000,100000 x batches 128,1024: CPU, and CUDA where present

Per device, center update (sgd: losses.RowSGD as in training.py, paper: losses.paper_center_update), batch and
class count, one loss step on random features is timed in three phases: forward (losses.StandaloneCenterLoss), backward, center
update. The class counts take turns in every round, so a slow spell falls on all alike; on the CPU the clock is this process's
CPU time, one thread: other processes' use of the cores is left out. Printed: each phase's median ms and, per update, the median
over rounds of the step's ratio at the most classes to the fewest, at the smallest batch, with its quartiles.
"""

import argparse
import functools
import itertools
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench import bounded, check_json
from losses import CENTER_UPDATES, RowSGD, StandaloneCenterLoss, paper_center_update


def counts(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip().isdigit()]
    if len(values) != len(text.split(",")) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, comma-separated")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags; what would crash later, time nothing or not fit in memory is refused in one line (exit 2) before any timing."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    cuda, add = torch.cuda.is_available(), p.add_argument
    add("--classes", type=counts, default=[10, 1000, 100_000], help="comma-separated class counts")
    add("--batches", type=counts, default=[128, 1024], help="comma-separated batch sizes")
    add("--feat-dim", type=bounded(1), default=128)
    add("--updates", default="sgd,paper", help="comma-separated: sgd, paper")
    add("--devices", default="cpu,cuda" if cuda else "cpu", help="comma-separated: cpu, cuda")
    add("--repeats", type=bounded(1), default=30, help="timed rounds")
    add("--warmup", type=bounded(0), default=5, help="untimed rounds first")
    add("--json", default=None, help="also write every median and ratio here")
    args = p.parse_args(argv)
    for flag, given, allowed in (
        ("--updates", args.updates, CENTER_UPDATES),
        ("--devices", args.devices, ("cpu", "cuda")[: 1 + cuda]),
    ):
        if not set(given.split(",")) <= set(allowed):
            no_cuda = "; no CUDA device here" * (flag == "--devices" and not cuda)
            p.error(f"{flag} {given!r}: choose from {', '.join(allowed)}, comma-separated{no_cuda}")
    # C x D centers, momentum, gradient; m x m
    need = 4 * (3 * max(args.classes) * args.feat_dim + 4 * max(args.batches) ** 2)
    memory = {
        "cuda": lambda: torch.cuda.mem_get_info()[0],
        # Windows has no sysconf: the check is skipped there
        "cpu": lambda: (
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            if hasattr(os, "sysconf")
            else float("inf")
        ),
    }
    if need > (have := min(memory[d]() for d in args.devices.split(","))) / 2:
        needs = f"the largest setting needs {need / 2**30:.1f} GiB"
        p.error(f"{needs}, more than half of the {have / 2**30:.1f} GiB here")
    check_json(p, args.json)
    return args


def loss_step(
    num_classes: int, batch: int, feat_dim: int, update: str, device: torch.device
) -> list[Callable]:
    """One loss step's three phases on fixed random features and labels, run in order, each given the previous one's output."""
    g = torch.Generator().manual_seed(0)
    criterion = StandaloneCenterLoss(num_classes, feat_dim, sparse=update == "sgd").to(device)
    centers = criterion.centers.requires_grad_(update == "sgd")
    optimizer = RowSGD(centers, lr=0.01, momentum=0.9) if update == "sgd" else None
    features = torch.randn(batch, feat_dim, generator=g).to(device).requires_grad_()
    labels = torch.randint(0, num_classes, (batch,), generator=g).to(device)

    def forward(_: None) -> torch.Tensor:
        features.grad = None
        return criterion(features, labels)

    paper = functools.partial(paper_center_update, centers.data, features.detach(), labels, 0.5)
    return [
        forward,
        torch.Tensor.backward,
        lambda _: optimizer.step(labels, criterion.rows.grad) if optimizer else paper(),
    ]


def time_settings(
    steps: list[list[Callable]], repeats: int, warmup: int, device: torch.device
) -> list[dict[str, list]]:
    """ms of each phase and of the whole step, one per timed round, for each setting; the settings take turns in every round."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else lambda: None
    clock = time.perf_counter if cuda else time.process_time
    times = [{name: [] for name in ("forward", "backward", "center_update", "step")} for _ in steps]
    for i in range(warmup + repeats):
        for phases, record in zip(steps, times):
            # every phase ends with a sync: the previous one's work is done
            marks, out = ([clock()], None)
            for phase in phases:
                out = phase(out)
                sync()
                marks.append(clock())
            elapsed = [(end - start) * 1000 for start, end in zip(marks, marks[1:])]
            for name, ms in zip(record, (*elapsed, sum(elapsed))):
                record[name] += [ms] if i >= warmup else []
    return times


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # with two threads on a busy 2-core machine a step waits for a descheduled one (ratios 118, 0.02)
    torch.set_num_threads(1)
    results, ratios, few, many = [], [], min(args.classes), max(args.classes)
    settings = itertools.product(args.devices.split(","), args.updates.split(","), args.batches)
    for device, update, m in settings:
        steps = [loss_step(c, m, args.feat_dim, update, torch.device(device)) for c in args.classes]
        timed = time_settings(steps, args.repeats, args.warmup, torch.device(device))
        times, where = dict(zip(args.classes, timed)), dict(device=device, update=update, batch=m)
        for c, record in times.items():
            medians = {name: statistics.median(values) for name, values in record.items()}
            results.append(where | {"classes": c} | medians)
            ms = ", ".join(f"{k} {v:.3f} ms" for k, v in medians.items())
            print(f"{device} {update} batch {m} classes {c}: {ms}", flush=True)
        if m == min(args.batches):
            per_round = [a / b for a, b in zip(times[many]["step"], times[few]["step"])]
            ratio = statistics.median(per_round)
            two = per_round if per_round[1:] else per_round * 2  # quantiles takes two or more
            q1, _, q3 = statistics.quantiles(two, n=4, method="inclusive")
            ratios.append(where | {"ratio": ratio, "quartiles": [q1, q3]})
            head = f"{device}: classes {many} vs {few} at batch {m}"
            print(f"{head}: ratio {ratio:.2f} ({update}; quartiles {q1:.2f}-{q3:.2f})", flush=True)
    if args.json:
        report = dict(feat_dim=args.feat_dim, repeats=args.repeats, torch=torch.__version__)
        report |= dict(ratios=ratios, results=results)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
