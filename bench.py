"""Training throughput of the fast path against the study's DataLoader pipeline, in one process.

    python bench.py                                         # resnet, MNIST, standalone, feat-dim 2, batch 128
    python bench.py --no-channels-last --steps 30 --warmup 5 --rounds 3
    python bench.py --amp bf16 --json bench-bf16.json
    python bench.py --dataset cifar10 --loss xent --device cuda --amp bf16 --compile
    python bench.py --fast-only --device cuda --cuda-graph --start-at $(($(date +%s) + 15))   # gpu_plan.py measure starts several so
    python bench.py --accuracy-epochs 3 --seeds 0,1,2 --amp bf16   # test accuracy: fast path vs the float32 loader path

Both pipelines train their own copy of main.py's model, objective and SGD optimiser, built from
the same seed, with main.py's training step (autocast, loss in float32, the sync-free divergence guard,
GradScaler for fp16). The loader path is the study's: torchvision per-sample transforms and a
DataLoader with --workers processes, float32 (--loader-amp) and contiguous NCHW
(--loader-channels-last); the fast path keeps the data on the device and augments whole batches
there, with --amp, --channels-last and --compile.

After --warmup untimed steps of each pipeline, they take turns for --rounds rounds of --steps timed
steps (the order swaps every round), so machine noise hits both. Every round opens a fresh batch
stream, as every epoch of main.py does, and takes its first batch untimed: DataLoader workers start
there, which main.py pays once per epoch; that time is reported on its own (first_step_s).
Reported: the operations one step of the fast path issues (ops_per_step: torch.profiler's top-level
aten ops that launch a kernel), train samples/s of each pipeline (median over rounds), the ratio fast/loader (also per
round, the two pipelines' rounds being back to back), samples per CPU second (this process and its
DataLoader workers, start-up included; less sensitive to other load on a shared machine), and peak
memory: on CUDA torch.cuda.max_memory_allocated per pipeline; on the CPU the peak resident set of
the whole process (ru_maxrss, both pipelines together) and of the largest finished child process
(a DataLoader worker; with --compile also inductor's compile workers).

On a CPU shared with other work, OpenMP's default busy-waiting makes every extra runnable process
(DataLoader workers included) very costly to the training threads; compare with
OMP_WAIT_POLICY=PASSIVE, recorded in the JSON's "environment".

--accuracy-epochs K instead trains K epochs with main.py (subprocesses, --no-plots) for every seed
of --seeds: the float32 loader path and the fast path with the settings given here, and reports
both test accuracies, their difference in points per seed and the mean over the seeds. The two
pipelines draw different augmentations from the same distributions, so one seed's difference
mixes the pipelines' effect with augmentation noise; the mean over several seeds separates them.
Finished runs of the same settings are reused (run once per --amp: the loader runs are shared).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch

from config import parse_args as parse_main_args
from datasets import DATASETS, DataError, Dataset, ImageData, canonical_name, default_workers, load_dataset, loader_batches, tensor_batches
from losses import LOSSES
from models import MODELS
from training import AMP_DTYPES, Trainer, build_trainer, cuda_backends, train_step
from utils import epoch_generator, resolve_device

REPO = Path(__file__).resolve().parent


def default_data_dir() -> str:
    shared = REPO.parent / "shared" / "data"
    return str(shared) if shared.is_dir() else "data"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="resnet")
    p.add_argument("--dataset", type=canonical_name, choices=DATASETS, default="mnist")
    p.add_argument("--data-dir", default=default_data_dir())
    p.add_argument("--loss", choices=LOSSES, default="standalone")
    p.add_argument("--feat-dim", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, ...")
    p.add_argument("--amp", choices=tuple(AMP_DTYPES), default="off", help="autocast precision of the fast path")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="channels_last on the fast path")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast path's model")
    p.add_argument(
        "--cuda-graph", action="store_true", help="the fast path's step captured in a CUDA graph (main.py --cuda-graph; CUDA, --fast-only)"
    )
    p.add_argument(
        "--start-at",
        type=float,
        default=None,
        help="Unix time to begin the timed rounds at, after warm-up: processes launched together time the same seconds",
    )
    p.add_argument("--loader-amp", choices=tuple(AMP_DTYPES), default="off", help="autocast precision of the loader path")
    p.add_argument("--loader-channels-last", action=argparse.BooleanOptionalAction, default=False, help="channels_last on the loader path")
    p.add_argument("--workers", type=int, default=default_workers(), help="DataLoader workers of the loader path")
    p.add_argument("--steps", type=int, default=30, help="timed steps per round and pipeline")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per pipeline before the first round")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each pipeline's samples/s is the median over them")
    p.add_argument("--fast-only", action="store_true", help="time the fast path only")
    p.add_argument("--json", default="bench.json", help="write the results here")
    p.add_argument("--accuracy-epochs", type=int, default=0, help="instead of timing: train K epochs with main.py, compare accuracy")
    p.add_argument("--seeds", type=seed_list, default=None, help="--accuracy-epochs only: comma-separated seeds (default: --seed)")
    p.add_argument("--train-samples", type=int, default=None, help="--accuracy-epochs only: first N train samples (quick checks)")
    p.add_argument("--out", default="runs-bench", help="--accuracy-epochs only: folder of main.py's run folders")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.steps, args.rounds, args.batch_size - 1, args.feat_dim) < 1 or min(args.warmup, args.workers, args.accuracy_epochs) < 0:
        parser.error("--steps, --rounds and --feat-dim must be at least 1, --batch-size at least 2, the others not negative")
    if args.cuda_graph and not args.fast_only:
        parser.error("--cuda-graph times the fast path only: add --fast-only")
    args.seeds = args.seeds or [args.seed]
    return args


def seed_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, got {text!r}") from None


# ------------------------------------------------------------------------------------------- setup


def build_pipeline_trainer(args: argparse.Namespace, data: Dataset, device: torch.device, settings: dict) -> Trainer:
    """main.py's trainer for this configuration: main.py's defaults (lr, momentum, loss weights) and
    the pipeline's amp, channels_last and compile."""
    flags = ["--model", args.model, "--loss", args.loss, "--feat-dim", str(args.feat_dim), "--seed", str(args.seed)]
    flags += ["--amp", settings["amp"], "--channels-last" if settings["channels_last"] else "--no-channels-last"]
    flags += ["--compile"] if settings["compile"] else []
    flags += ["--cuda-graph", "--device", args.device] if settings.get("cuda_graph") else []
    return build_trainer(parse_main_args(flags), data, device)


def batch_stream(pipeline: dict, args: argparse.Namespace, device: torch.device, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches from global step `step` on, over as many epochs as it takes, each in main.py's order."""
    data: ImageData = pipeline["data"]
    steps_per_epoch = -(-len(data) // args.batch_size)
    epoch, start = divmod(step, steps_per_epoch)
    while True:
        epoch += 1
        order = torch.randperm(len(data), generator=epoch_generator(args.seed, epoch))
        if pipeline["name"] == "fast":
            yield from tensor_batches(data, order, args.batch_size, pipeline["augmentations"], pipeline["aug"], start=start)
        else:
            gen = epoch_generator(args.seed, epoch)
            yield from loader_batches(data, order, args.batch_size, pipeline["augmentations"], gen, args.workers, device, start=start)
        start = 0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(pipeline: dict, args: argparse.Namespace, device: torch.device, steps: int) -> dict:
    """Train `steps` timed steps on a fresh batch stream after one untimed first batch."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stream = batch_stream(pipeline, args, device, pipeline["step"])
    started = time.perf_counter()
    x, y = next(stream)
    pipeline["train_step"](x, y)
    synchronize(device)
    first = time.perf_counter() - started
    samples = 0
    cpu_before = cpu_seconds()
    started = time.perf_counter()
    for _ in range(steps):
        x, y = next(stream)
        pipeline["train_step"](x, y)
        samples += len(y)
    synchronize(device)
    seconds = time.perf_counter() - started
    stream.close()  # shuts the DataLoader's workers down (and waits for them) before the other pipeline runs
    cpu_main, cpu_workers = (after - before for after, before in zip(cpu_seconds(), cpu_before))
    pipeline["step"] += steps + 1
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "samples": samples,
        "seconds": seconds,
        "samples_per_s": samples / seconds,
        "samples_per_cpu_s": samples / (cpu_main + cpu_workers),
        "cpu_main_s": cpu_main,
        "cpu_workers_s": cpu_workers,
        "first_step_s": first,
        "peak_mib": peak,
    }


# aten ops that launch no kernel: views, aliases, metadata and bare allocations (and their no-op
# forms: a `to` or `contiguous` that copies nothing). An op of this list that does copy has a child
# that launches, and counts.
NO_KERNEL_OPS = {
    f"aten::{name}"
    for name in "detach view t expand expand_as unsqueeze squeeze as_strided reshape _reshape_alias flatten unbind select slice "
    "permute transpose alias _unsafe_view view_as split chunk narrow empty empty_like empty_strided resize_ lift_fresh to "
    "contiguous result_type broadcast_tensors".split()
}


def ops_per_step(trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> dict[str, int]:
    """The operations one train_step issues, counted with torch.profiler on the CPU: aten ops called at
    the top level (not from inside another aten op: conv2d counts once, not with the convolution it
    calls), in the forward and in the autograd engine's backward, except those that launch no kernel
    (NO_KERNEL_OPS). A foreach or fused op (one multi-tensor kernel on CUDA) counts once. Returns the
    count per op name."""
    from torch.profiler import ProfilerActivity, profile

    def launches(event) -> bool:
        return event.name not in NO_KERNEL_OPS or any(launches(c) for c in event.cpu_children if c.name.startswith("aten::"))

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(trainer, x, y)
    counts: dict[str, int] = {}
    for event in prof.events():
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if event.name.startswith("aten::") and parent is None and launches(event):
            counts[event.name] = counts.get(event.name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def cpu_seconds() -> tuple[float, float]:
    """CPU time of this process and of its finished children (the DataLoader workers, once shut down)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, children.ru_utime + children.ru_stime


def peak_rss_mib() -> dict:
    """Peak resident set sizes in MiB: this process and its largest finished child (DataLoader or compile worker)."""
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
    return {
        "process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2**20,
        "largest_worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * unit / 2**20,
    }


# --------------------------------------------------------------------------------------- benchmark


def make_pipeline(name: str, args: argparse.Namespace, data, device: torch.device) -> dict:
    if name == "fast":
        settings = {"amp": args.amp, "channels_last": args.channels_last, "compile": args.compile, "cuda_graph": args.cuda_graph}
        train = data.train.to(device)
    else:
        settings = {"amp": args.loader_amp, "channels_last": args.loader_channels_last, "compile": False, "workers": args.workers}
        train = data.train
    trainer = build_pipeline_trainer(args, data, device, settings)
    return {
        "name": name,
        "settings": settings,
        "data": train,
        "augmentations": data.augmentations,
        "aug": torch.Generator(device).manual_seed(args.seed + 1),  # augmentation draws on the training device
        "trainer": trainer,
        "train_step": partial(train_step, trainer),
        "step": 0,
        "rounds": [],
    }


def benchmark(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    cuda_backends(device)
    load_before = os.getloadavg()
    data = load_dataset(args.dataset, args.data_dir, download=False)
    names = ("fast",) if args.fast_only else ("loader", "fast")
    pipelines = [make_pipeline(name, args, data, device) for name in names]
    print(
        f"{args.model} {args.loss} feat_dim={args.feat_dim} on {data.name} ({len(data.train)} train, augmentations {list(data.augmentations)}), "
        f"batch {args.batch_size}, {device}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}"
    )
    for p in pipelines:
        print(f"  {p['name']:6s} {p['settings']}")
    if args.warmup > 0:
        for p in pipelines:
            run_steps(p, args, device, args.warmup - 1)
    if args.start_at is not None:
        time.sleep(max(0.0, args.start_at - time.time()))
    for r in range(args.rounds):
        for p in pipelines if r % 2 == 0 else pipelines[::-1]:
            result = run_steps(p, args, device, args.steps)
            p["rounds"].append(result)
            print(f"  round {r + 1}/{args.rounds} {p['name']:6s} {result['samples_per_s']:8.1f} samples/s  ({result['seconds']:.1f}s)")
    results = {}
    for p in pipelines:
        rounds = p["rounds"]
        results[p["name"]] = {
            **p["settings"],
            "samples_per_s": statistics.median(r["samples_per_s"] for r in rounds),
            "rounds_samples_per_s": [r["samples_per_s"] for r in rounds],
            "samples_per_cpu_s": statistics.median(r["samples_per_cpu_s"] for r in rounds),
            "cpu_main_s_per_round": [r["cpu_main_s"] for r in rounds],
            "cpu_workers_s_per_round": [r["cpu_workers_s"] for r in rounds],
            "wall_s_per_round": [r["seconds"] for r in rounds],
            "first_step_s": statistics.median(r["first_step_s"] for r in rounds),
            "peak_memory_mib": max(r["peak_mib"] for r in rounds) if device.type == "cuda" else None,
        }
    fast = next(p for p in pipelines if p["name"] == "fast")
    operations = {}
    if not args.cuda_graph:  # a captured step is one graph launch; its eager count is that of the run without --cuda-graph
        x, y = next(batch_stream(fast, args, device, 0))
        operations = ops_per_step(fast["trainer"], x, y)  # one more step of the fast path (its cost is not timed)
        print(f"operations per step of the fast path: {sum(operations.values())} (torch.profiler, top-level aten ops that launch a kernel)")
    ratio = round_ratios = cpu_ratio = None
    if not args.fast_only:
        ratio = results["fast"]["samples_per_s"] / results["loader"]["samples_per_s"]
        fast, loader = (p["rounds"] for p in pipelines[::-1])
        round_ratios = [f["samples_per_s"] / lo["samples_per_s"] for f, lo in zip(fast, loader)]
        cpu_ratio = results["fast"]["samples_per_cpu_s"] / results["loader"]["samples_per_cpu_s"]
    if device.type == "cuda":
        memory = {"kind": "torch.cuda.max_memory_allocated per pipeline (MiB)", **{n: results[n]["peak_memory_mib"] for n in results}}
    else:
        memory = {
            "kind": "CPU peak resident set (ru_maxrss, MiB): whole process, both pipelines; largest finished child (DataLoader or compile worker)",
            **peak_rss_mib(),
        }
    report = {
        "config": {k: v for k, v in vars(args).items() if k not in ("accuracy_epochs", "seeds", "train_samples", "out")},
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "environment": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")},
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],
        "pipelines": results,
        "ratio_fast_over_loader": ratio,
        "ratio_per_round": round_ratios,
        "ratio_per_round_median": statistics.median(round_ratios) if round_ratios else None,
        "ratio_samples_per_cpu_s": cpu_ratio,
        "peak_memory": memory,
        "ops_per_step": sum(operations.values()) if operations else None,
        "ops_per_step_by_name": operations,
    }
    for name, res in results.items():
        print(
            f"{name:6s} {res['samples_per_s']:8.1f} samples/s (median of {args.rounds} rounds), "
            f"{res['samples_per_cpu_s']:6.1f} samples per CPU second, first step {res['first_step_s']:.2f}s"
        )
    if ratio is not None:
        print(f"ratio fast/loader {ratio:.2f}x (per round: {', '.join(f'{r:.2f}' for r in round_ratios)}; per CPU second {cpu_ratio:.2f}x)")
    print("peak memory: " + ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k}: {v}" for k, v in memory.items()))
    return report


# ---------------------------------------------------------------------------------------- accuracy


def accuracy_check(args: argparse.Namespace) -> dict:
    """Train --accuracy-epochs epochs with main.py for every seed: the loader path and the fast path as set here.

    A finished run whose summary records the same settings is reused, so the loader runs serve
    several fast-path settings (run the check once per --amp).
    """
    out = Path(args.out).resolve()
    common = {
        "dataset": args.dataset, "data_dir": args.data_dir, "model": args.model, "loss": args.loss,
        "feat_dim": args.feat_dim, "batch_size": args.batch_size, "device": args.device,
        "epochs": args.accuracy_epochs, "train_samples": args.train_samples,
    }  # fmt: skip
    settings = {
        "loader": {"pipeline": "loader", "workers": args.workers, "amp": args.loader_amp, "channels_last": args.loader_channels_last},
        "fast": {"pipeline": "fast", "amp": args.amp, "channels_last": args.channels_last, "compile": args.compile},
    }
    keys = ("pipeline", "amp", "channels_last", "compile", "seed", "acc", "best_acc", "ncm_acc", "samples_per_second", "train_seconds")
    per_seed = []
    for seed in args.seeds:
        results = {}
        for label, extra in settings.items():
            config = common | extra | {"seed": seed}
            summary = train_or_reuse(out, config)
            results[label] = {k: summary[k] for k in keys} | {"run": summary["run"]}
        difference = 100 * (results["fast"]["acc"] - results["loader"]["acc"])
        per_seed.append({"seed": seed, "runs": results, "difference_points": difference})
        print(f"seed {seed}: test accuracy after {args.accuracy_epochs} epochs: loader {results['loader']['acc']:.4f}, "
              f"fast {results['fast']['acc']:.4f} ({difference:+.2f} points)", flush=True)  # fmt: skip
    means = {label: statistics.mean(s["runs"][label]["acc"] for s in per_seed) for label in settings}
    mean_difference = 100 * (means["fast"] - means["loader"])
    spread = statistics.stdev(s["difference_points"] for s in per_seed) if len(per_seed) > 1 else None
    print(
        f"mean over {len(per_seed)} seed(s): loader {means['loader']:.4f}, fast {means['fast']:.4f} ({mean_difference:+.2f} points"
        + (f"; per-seed differences have a standard deviation of {spread:.2f} points)" if spread is not None else ")")
    )
    return {
        "epochs": args.accuracy_epochs,
        "train_samples": args.train_samples,
        "seeds": per_seed,
        "mean_acc": means,
        "mean_difference_points": mean_difference,
        "difference_stdev_points": spread,
    }


def train_or_reuse(out: Path, config: dict) -> dict:
    """The summary of main.py run with these settings: an existing finished one, or a new one (--no-plots)."""
    name = "bench-" + "-".join(
        [config["pipeline"], config["amp"], *(["cl"] if config["channels_last"] else []), *(["compiled"] if config.get("compile") else []),
         config["model"], config["loss"], config["dataset"], f"feat={config['feat_dim']}", f"batch={config['batch_size']}",
         f"epochs={config['epochs']}", *([f"n={config['train_samples']}"] if config["train_samples"] else []), f"seed={config['seed']}"]
    )  # fmt: skip
    summary_path = out / name / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if all(summary.get(k) == v for k, v in config.items() if k not in ("data_dir", "device", "workers")):
            print(f"reusing the finished run {out / name} (delete it to train again)", flush=True)
            return summary | {"run": str(out / name)}
    command = [sys.executable, str(REPO / "main.py"), "--name", name, "--out", str(out), "--no-plots", "--overwrite"]
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        if key == "channels_last":
            command.append(flag if value else "--no-channels-last")
        elif key == "compile":
            command += [flag] if value else []
        elif value is not None:
            command += [flag, str(value)]
    print("$ " + " ".join(command[1:]), flush=True)
    if subprocess.run(command, cwd=REPO).returncode != 0:
        raise SystemExit(f"bench.py: error: main.py failed for {name} (command above)")
    return json.loads(summary_path.read_text()) | {"run": str(out / name)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = accuracy_check(args) if args.accuracy_epochs else benchmark(args)
    except DataError as exc:
        print(f"bench.py: error: {exc}", file=sys.stderr)
        return 1
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
