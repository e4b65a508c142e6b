"""Training samples/s of the fast path (`--pipeline fast`) against the study's DataLoader path, in one process.

    python bench.py --dataset mnist --data-dir ../shared/data              # main.py's MNIST settings, both pipelines
    python bench.py --fast-only --repo ../old-checkout --json old-1.json   # another commit's code, same benchmark

Other flags (--amp bf16, ...) go to main.py's parser. Both pipelines train its model, loss and train_step: the loader path as the
study does (torchvision transforms, --workers DataLoader processes, --loader-amp, NCHW), the fast path on batches augmented on the
device (--amp, --channels-last, --compile); they take turns after --warmup steps, --rounds rounds of --steps timed steps each.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

MAX_STEPS = 10_000  # per round: minutes on a CPU; a typo's 10**9 would run for days


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        allow_abbrev=False,
        epilog="Other flags: main.py --help.",
    )
    p.add_argument("--steps", type=int, default=30, help="timed steps per round and pipeline")
    p.add_argument(
        "--warmup", type=int, default=5, help="untimed steps per pipeline before the first round"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds; each pipeline's samples/s is the median over them",
    )
    p.add_argument(
        "--workers", type=int, help="DataLoader workers of the loader path (default: min(4, cores))"
    )
    p.add_argument(
        "--loader-amp",
        choices=("off", "bf16", "fp16"),
        help="autocast precision of the loader path (default off)",
    )
    p.add_argument("--fast-only", action="store_true", help="time the fast path only")
    p.add_argument(
        "--json", default="bench.json", help="write the report here (checked before anything runs)"
    )
    p.add_argument(
        "--repo",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="the checkout whose code is timed",
    )
    args, main_flags = p.parse_known_args(argv)
    if args.fast_only and (args.workers is not None or args.loader_amp is not None):
        p.error(
            "--workers and --loader-amp set the loader path, which --fast-only does not run; drop them"
        )
    if not args.fast_only:
        args.workers = min(4, os.cpu_count() or 1) if args.workers is None else args.workers
        args.loader_amp = args.loader_amp or "off"
    if not (
        1 <= args.steps <= MAX_STEPS
        and 1 <= args.rounds <= 100
        and 0 <= args.warmup <= MAX_STEPS
        and (args.workers or 0) >= 0
    ):
        p.error(
            f"--steps must be 1 to {MAX_STEPS}, --rounds 1 to 100, --warmup 0 to {MAX_STEPS}, --workers not negative"
        )
    if not (args.repo / "main.py").is_file():
        p.error(f"--repo {args.repo}: no main.py there; give a checkout of this project")
    if (
        args.json.strip() == ""
        or Path(args.json).is_dir()
        or (Path(args.json).is_symlink() and not Path(args.json).exists())  # dangling, or a loop
        or not os.access(Path(args.json).parent, os.W_OK)
    ):
        p.error(
            f"--json {args.json!r}: give a file in an existing, writable folder (checked first, so no timing is lost)"
        )
    return args, main_flags


def stream(p: dict, args: argparse.Namespace, m: argparse.Namespace, device) -> Iterator:
    """Batches from global step p['step'] on, epoch after epoch, each epoch in main.py's order."""
    import batches
    from utils import epoch_generator

    epoch, start = divmod(p["step"], len(p["data"]) // m.batch_size)
    while True:
        order = torch.randperm(
            len(p["data"]), generator=epoch_generator(m.seed, epoch := epoch + 1)
        )
        if p["name"] == "fast":
            yield from batches.tensor_batches(
                p["data"], order, m.batch_size, p["augs"], p["aug"], start=start
            )
        else:
            gen = epoch_generator(m.seed, epoch)
            yield from batches.loader_batches(
                p["data"], order, m.batch_size, p["augs"], gen, args.workers, device, start=start
            )
        start = 0


def cpu_seconds() -> float:
    """CPU seconds of this process and its ended DataLoader workers; Windows has no `resource`: this process's only."""
    try:
        from resource import RUSAGE_CHILDREN, RUSAGE_SELF, getrusage
    except ImportError:
        return time.process_time()
    return sum(r.ru_utime + r.ru_stime for r in map(getrusage, (RUSAGE_SELF, RUSAGE_CHILDREN)))


def run_steps(p: dict, args: argparse.Namespace, m: argparse.Namespace, device, steps: int) -> dict:
    """`steps` timed steps on a fresh batch stream after one untimed batch; CPU time: this process and its DataLoader workers."""
    sync = torch.cuda.synchronize if device.type == "cuda" else torch.cpu.synchronize
    batch_stream, started = stream(p, args, m, device), time.perf_counter()
    p["step_fn"](*next(batch_stream))
    sync(device)
    first, samples, cpu = time.perf_counter() - started, 0, cpu_seconds()
    started = time.perf_counter()
    for x, y in (next(batch_stream) for _ in range(steps)):
        p["step_fn"](x, y)
        samples += len(y)
    sync(device)
    seconds = time.perf_counter() - started
    batch_stream.close()  # shuts the DataLoader's workers down (their CPU time then counts) before the other pipeline runs
    p["step"], cpu = p["step"] + steps + 1, max(cpu_seconds() - cpu, 1e-9)
    return dict(
        samples_per_s=samples / seconds,
        samples_per_cpu_s=samples / cpu,
        seconds=seconds,
        first_s=first,
    )


def benchmark(args: argparse.Namespace, main_flags: list[str]) -> dict:
    import datasets
    from config import parse_args as parse_main_args
    from training import build_trainer, cuda_backends, train_step
    from utils import resolve_device

    # main.py's checks (exit 2): an unknown --device, cuda without CUDA, ...
    m = parse_main_args(main_flags)
    device = resolve_device(m.device)
    if m.threads is not None:  # as main.py: --threads, 1 for digits
        torch.set_num_threads(m.threads)
    cuda_backends(device)  # as main.py runs: cuDNN autotuning, float32 without TF32
    data = datasets.load_dataset(m.dataset, m.data_dir or "data", download=False)
    if m.batch_size > len(data.train):
        print(
            f"bench.py: error: --batch-size {m.batch_size} is more than the {len(data.train)} train images",
            file=sys.stderr,
        )
        raise SystemExit(2)
    pipelines = []
    for name in ("fast",) if args.fast_only else ("loader", "fast"):
        loader = {"amp": args.loader_amp, "channels_last": False, "compile": False}
        s = argparse.Namespace(**vars(m) | (loader if name == "loader" else {}))
        step_fn = functools.partial(train_step, build_trainer(s, data, device))
        train, aug = (
            data.train.to(device) if name == "fast" else data.train,
            torch.Generator(device).manual_seed(m.seed + 1),
        )
        pipe = dict(name=name, data=train, augs=data.augmentations, aug=aug, step_fn=step_fn)
        pipelines.append(pipe | {"step": 0, "rounds": []})
    for p in pipelines if args.warmup else []:
        run_steps(p, args, m, device, args.warmup - 1)  # untimed: the first steps allocate and tune
    print(
        f"{m.model} {m.loss} feat_dim {m.feat_dim} on {data.name} ({len(data.train)} train), batch {m.batch_size}, {device}"
    )
    for r in range(args.rounds):
        for p in pipelines if r % 2 == 0 else pipelines[::-1]:
            p["rounds"].append(run_steps(p, args, m, device, args.steps))
            print(
                f"  round {r + 1}/{args.rounds} {p['name']:6s} {p['rounds'][-1]['samples_per_s']:8.1f} samples/s"
            )
    results = {
        p["name"]: {key: [r[key] for r in p["rounds"]] for key in p["rounds"][0]} for p in pipelines
    }
    for name, res in results.items():
        res["median_samples_per_s"], cpu = (
            statistics.median(res["samples_per_s"]),
            statistics.median(res["samples_per_cpu_s"]),
        )
        print(
            f"{name:6s} {res['median_samples_per_s']:8.1f} samples/s (median of {args.rounds}), {cpu:.1f} per CPU second"
        )

    def output(*cmd: str) -> str | None:
        if not shutil.which(cmd[0]):
            return None
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip() or None

    report = {
        "repo": str(args.repo.resolve()),
        "commit": output("git", "-C", str(args.repo), "rev-parse", "HEAD"),
        "device": str(device),
    }
    report |= {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "lscpu": output("lscpu"),
        "main_flags": main_flags,
    }
    peak_cuda_mib = (
        torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    )
    report |= {
        "bench": vars(args) | {"repo": str(args.repo)},
        "pipelines": results,
        "peak_cuda_mib": peak_cuda_mib,
    }
    if not args.fast_only:
        report["ratio_per_round"] = [
            f / lo
            for f, lo in zip(results["fast"]["samples_per_s"], results["loader"]["samples_per_s"])
        ]
        report["ratio_fast_over_loader"] = (
            results["fast"]["median_samples_per_s"] / results["loader"]["median_samples_per_s"]
        )
        per_round = ", ".join(f"{r:.2f}" for r in report["ratio_per_round"])
        print(f"ratio fast/loader {report['ratio_fast_over_loader']:.2f}x (per round: {per_round})")
    return report


def interrupted(signum: int, frame: object) -> None:
    """Ctrl-C or SIGTERM: a KeyboardInterrupt carrying the signal, for main() to report in one line."""
    raise KeyboardInterrupt(signum)


def main(argv: list[str] | None = None) -> int:
    args, main_flags = parse_args(argv)
    # the timed checkout's modules come before this file's folder
    sys.path.insert(0, str(args.repo.resolve()))
    import datasets

    previous = {
        signum: signal.signal(signum, interrupted) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        report = benchmark(args, main_flags)
    except datasets.DataError as exc:
        print(f"bench.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(
            "bench.py: interrupted; nothing was written (the rounds so far are lost)",
            file=sys.stderr,
        )
        return 128 + (exc.args[0] if exc.args else signal.SIGINT)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
