"""Training samples/s of the fast path (`--pipeline fast`) against the study's DataLoader path, in one process.

    python bench.py --dataset mnist --data-dir ../shared/data              # main.py's MNIST settings, both pipelines
    python bench.py --fast-only --repo ../old-checkout --json old-1.json   # another commit's code, same benchmark

Other flags (--amp bf16, ...) go to main.py's parser. Both pipelines train its model, loss and train_step: the loader path as the
study does (torchvision transforms, --workers DataLoader processes, --loader-amp, NCHW), the fast path on batches augmented on the
device (--amp, --channels-last, --compile); they take turns after --warmup steps, --rounds rounds of --steps timed steps each.
"""

import argparse
import functools
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

MAX_STEPS = 10_000  # per round: minutes on a CPU; a typo's 10**9 would run for days


def bounded(least: int, most: float = math.inf) -> Callable[[str], int]:
    """An argparse type (also bench_loss.py's): an integer from least to most, else one line, exit 2."""

    def integer(text: str) -> int:
        if not (re.fullmatch(r"-?\d+", text) and least <= int(text) <= most):
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer in [{least}, {most}]")
        return int(text)

    return integer


def check_json(parser: argparse.ArgumentParser, path: str | None) -> None:
    """Refuse (exit 2) a --json that cannot be written now, not after the timing; leave no file behind."""
    if path is None:
        return
    existed = os.path.exists(path)
    try:
        open(path, "a").close()
    except OSError as e:
        parser.error(f"--json {path!r}: cannot write there ({e.strerror})")
    if not existed:  # through a symlink: the file it points to
        os.remove(os.path.realpath(path))


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        allow_abbrev=False,
        epilog="Other flags: main.py --help.",
    )
    add = p.add_argument
    add("--steps", type=bounded(1, MAX_STEPS), default=30, help="timed steps a round and pipeline")
    add("--warmup", type=bounded(0, MAX_STEPS), default=5, help="untimed steps per pipeline first")
    add("--rounds", type=bounded(1, 100), default=3, help="rounds; samples/s: their median")
    add("--workers", type=bounded(0), help="DataLoader workers of the loader path (min(4, cores))")
    add("--loader-amp", choices=("off", "bf16", "fp16"), help="autocast of the loader path (off)")
    add("--fast-only", action="store_true", help="time the fast path only")
    add("--json", default="bench.json", help="write the report here (checked before anything runs)")
    add("--repo", type=Path, default=Path(__file__).resolve().parent, help="the checkout timed")
    args, main_flags = p.parse_known_args(argv)
    if args.fast_only and (args.workers is not None or args.loader_amp is not None):
        p.error("--workers and --loader-amp set the loader path, which --fast-only does not run")
    if not args.fast_only:
        args.workers = min(4, os.cpu_count() or 1) if args.workers is None else args.workers
        args.loader_amp = args.loader_amp or "off"
    if not (args.repo / "main.py").is_file():
        p.error(f"--repo {args.repo}: no main.py there; give a checkout of this project")
    check_json(p, args.json)
    return args, main_flags


def stream(p: dict, args: argparse.Namespace, m: argparse.Namespace, device) -> Iterator:
    """Batches from global step p['step'] on, epoch after epoch, each epoch in main.py's order."""
    import batches
    from utils import epoch_generator

    epoch, start = divmod(p["step"], len(p["data"]) // m.batch_size)
    while True:
        epoch += 1
        order = torch.randperm(len(p["data"]), generator=epoch_generator(m.seed, epoch))
        common = (p["data"], order, m.batch_size, p["augs"])
        if p["name"] == "fast":
            yield from batches.tensor_batches(*common, p["aug"], start=start)
        else:
            gen = epoch_generator(m.seed, epoch)
            yield from batches.loader_batches(*common, gen, args.workers, device, start=start)
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
    rates = dict(samples_per_s=samples / seconds, samples_per_cpu_s=samples / cpu)
    return rates | dict(seconds=seconds, first_s=first)


def output(*cmd: str) -> str | None:
    if not shutil.which(cmd[0]):
        return None
    return subprocess.run(cmd, capture_output=True, text=True).stdout.strip() or None


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
        more = f"--batch-size {m.batch_size} is more than the {len(data.train)} train images"
        print(f"bench.py: error: {more}", file=sys.stderr)
        raise SystemExit(2)
    pipelines, loader = [], {"amp": args.loader_amp, "channels_last": False, "compile": False}
    for name in ("fast",) if args.fast_only else ("loader", "fast"):
        s = vars(m) | (loader if name == "loader" else {})
        trainer = build_trainer(argparse.Namespace(**s), data, device)
        train = data.train.to(device) if name == "fast" else data.train
        aug = torch.Generator(device).manual_seed(m.seed + 1)
        p = dict(name=name, data=train, augs=data.augmentations, aug=aug, step=0, rounds=[])
        pipelines.append(p | {"step_fn": functools.partial(train_step, trainer)})
    for p in pipelines if args.warmup else []:
        run_steps(p, args, m, device, args.warmup - 1)  # untimed: the first steps allocate and tune
    setting = f"{m.model} {m.loss} feat_dim {m.feat_dim} on {data.name} ({len(data.train)} train)"
    print(f"{setting}, batch {m.batch_size}, {device}")
    for r in range(1, args.rounds + 1):  # odd rounds in order, even ones reversed
        for p in pipelines if r % 2 else pipelines[::-1]:
            p["rounds"].append(res := run_steps(p, args, m, device, args.steps))
            print(f"  round {r}/{args.rounds} {p['name']:6s} {res['samples_per_s']:8.1f} samples/s")
    results = {}
    for p in pipelines:
        res = results[p["name"]] = {k: [r[k] for r in p["rounds"]] for k in p["rounds"][0]}
        median = res["median_samples_per_s"] = statistics.median(res["samples_per_s"])
        cpu = f"{statistics.median(res['samples_per_cpu_s']):.1f} per CPU second"
        print(f"{p['name']:6s} {median:8.1f} samples/s (median of {args.rounds}), {cpu}")
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    report = {
        "repo": str(args.repo.resolve()),
        "commit": output("git", "-C", str(args.repo), "rev-parse", "HEAD"),
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "lscpu": output("lscpu"),
        "main_flags": main_flags,
        "bench": vars(args) | {"repo": str(args.repo)},
        "pipelines": results,
        "peak_cuda_mib": peak,
    }
    if not args.fast_only:
        fast, slow, median = results["fast"], results["loader"], "median_samples_per_s"
        per_round = [f / s for f, s in zip(fast["samples_per_s"], slow["samples_per_s"])]
        report["ratio_per_round"] = per_round
        report["ratio_fast_over_loader"] = fast[median] / slow[median]
        rounds = ", ".join(f"{r:.2f}" for r in per_round)
        print(f"ratio fast/loader {report['ratio_fast_over_loader']:.2f}x (per round: {rounds})")
    return report


def interrupted(signum: int, frame: object) -> None:
    """Ctrl-C or SIGTERM: a KeyboardInterrupt carrying the signal, for main() to report in one line."""
    raise KeyboardInterrupt(signum)


def main(argv: list[str] | None = None) -> int:
    args, main_flags = parse_args(argv)
    # the timed checkout's modules come before this file's folder
    sys.path.insert(0, str(args.repo.resolve()))
    import datasets

    previous = {how: signal.signal(how, interrupted) for how in (signal.SIGINT, signal.SIGTERM)}
    try:
        report = benchmark(args, main_flags)
    except datasets.DataError as exc:
        print(f"bench.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        lost = "nothing was written (the rounds so far are lost)"
        sys.stderr.write(f"bench.py: interrupted; {lost}\n")
        return 128 + (exc.args[0] if exc.args else signal.SIGINT)
    finally:
        for how, handler in previous.items():
            signal.signal(how, handler)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
