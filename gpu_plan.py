"""The study's table at 100 epochs on one GPU, inside one device lease: pack here, then two calls there.

    python gpu_plan.py pack                               # here, once: .device-data/data.tar.xz (all three data sets, xz)
    python gpu_plan.py measure --out $OUT                 # call 1 (~2 min): tests/test_cuda.py, steps/s of 1, 6, 18 runs at once
    python gpu_plan.py table --out $OUT --jobs 18 --mode graph   # call 2 (~9.5 min): the 18 runs of the grid at 100 epochs

Every call carries the same archive (`carry: [".device-data"]`), so no call needs the machine to stay warm.

measure: unpacks MNIST, runs tests/test_cuda.py (--test-timeout), then for each entry of --matrix (JOBS:MODE-AMP,
e.g. 6:graph-fp32) launches JOBS `bench.py --fast-only` processes together (MNIST, resnet, standalone, batch 128;
--cuda-graph for graph, --amp bf16 for bf16) that time the same seconds (--start-at) and sums their samples/s.
Writes $OUT/measure.json and measure.log and prints the fastest float32 setting as call 2's command line.

table: unpacks all three data sets and runs reproduce.sh over the grid (EPOCHS, JOBS runs at once, OMP_NUM_THREADS =
CPUs / JOBS each) until --budget seconds after its start, then stops the runs with SIGTERM (each saves a checkpoint;
SIGKILL after --grace). A run killed while drawing its final pictures (all epochs done, no summary.json) is finished
from its checkpoint in the --finish seconds left. Stopped 2-D runs get their frames drawn from the saved frame data.
Then report.py collects the rows into results/gpu-100ep/<run>.json (an unfinished run as its last metrics.csv row,
marked "unfinished") and the files for the trip back go to $OUT, at most 8 (16 MiB each, 64 MiB in all):
    table.json, table.log        the plan's figures: GPU, wall times, per run status, epochs, samples/s, peak GPU memory
    gpu-100ep.tgz                results/gpu-100ep/*.json, results/gpu-plan/*, the runs' logs, args.json and metrics.csv
    gifs-N.tgz                   imgs/<run>/{train,test}.gif of finished 2-D runs, imgs-unfinished/<run>/ of stopped ones
Here, in the repository root: `tar -xzf gpu-100ep.tgz` and each gifs-N.tgz, then report.py (docs/speed.md, The GPU plan).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
ARCHIVE = ".device-data/data.tar.xz"
DATA_SETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "cifar10-jpg"}  # main.py name: folder in the archive
DEVICE_LIMIT = 64 * 2**20  # what one device call carries (repository + carried paths) and brings back in all
FILE_LIMIT = 16 * 2**20  # one file brought back
MAX_FILES = 8
MATRIX = "18:graph-fp32 6:graph-fp32 1:graph-fp32 1:eager-fp32 6:eager-fp32 1:graph-bf16"  # the most telling first: --deadline cuts the end
MATRIX_ENTRY = r"([1-9][0-9]*):(eager|graph)-(fp32|bf16)"
GRID_SAMPLES = {"mnist": 60000, "fashion-mnist": 60000, "cifar10": 50000}  # train samples per epoch of each data set


class Log:
    """print() that also keeps every line for $OUT/<part>.log."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, text: str) -> None:
        print(text, flush=True)
        self.lines.append(text)

    def save(self, path: Path) -> None:
        path.write_text("\n".join(self.lines) + "\n")


def machine() -> dict:
    """torch, GPU name and CPU count of this machine (torch imported here only: pack needs none)."""
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
    return {"torch": torch.__version__, "gpu": gpu, "cpus": os.cpu_count()}


def unpack(archive: Path, data_dir: Path, folders: list[str]) -> float:
    """Extract `folders` of the archive into data_dir; returns the seconds it took."""
    if not archive.is_file():
        raise SystemExit(f"gpu_plan.py: error: {archive} is missing; run `python gpu_plan.py pack` here and carry .device-data")
    started = time.perf_counter()
    data_dir.mkdir(parents=True, exist_ok=True)
    if shutil.which("xz"):  # GNU tar with xz: faster than tarfile over 60,000 small JPEGs
        subprocess.run(["tar", "-xJf", str(archive), "-C", str(data_dir), *folders], check=True)
    else:
        with tarfile.open(archive, "r:xz") as tar:
            tar.extractall(data_dir, [m for m in tar if m.name.split("/")[0] in folders], filter="data")
    return time.perf_counter() - started


def pack(args: argparse.Namespace, log: Log) -> int:
    """xz archive of the three data sets, and whether it travels beside the repository's tracked files."""
    archive = Path(args.archive)
    archive.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    env = os.environ | {"XZ_OPT": os.environ.get("XZ_OPT", f"-9 -T{os.cpu_count()}")}
    subprocess.run(["tar", "-C", str(args.data_dir), "-cJf", str(archive), *DATA_SETS.values()], check=True, env=env)
    seconds = time.perf_counter() - started
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    repo_bytes = sum((REPO / f).stat().st_size for f in tracked if f and (REPO / f).is_file())
    total = repo_bytes + archive.stat().st_size
    log(f"{archive}: {archive.stat().st_size / 1e6:.1f} MB in {seconds:.0f} s (XZ_OPT={env['XZ_OPT']}); repository {repo_bytes / 1e6:.1f} MB; "
        f"together {total / 2**20:.1f} MiB of the {DEVICE_LIMIT // 2**20} MiB a call carries")  # fmt: skip
    if total >= DEVICE_LIMIT:
        log("gpu_plan.py: error: repository + archive do not fit in one device call")
        return 1
    return 0


# ------------------------------------------------------------------------------------------ call 1


def bench_group(args: argparse.Namespace, jobs: int, mode: str, amp: str, folder: Path) -> dict:
    """`jobs` bench.py processes launched together, timing the same seconds; their samples/s summed."""
    start_at = time.time() + args.startup + args.startup_per_job * jobs
    flags = ["--fast-only", "--device", args.device, "--data-dir", str(args.data_dir), "--amp", "bf16" if amp == "bf16" else "off"]
    flags += ["--steps", str(args.steps), "--rounds", str(args.rounds), "--warmup", str(args.warmup), "--start-at", f"{start_at:.3f}"]
    flags += ["--cuda-graph"] if mode == "graph" else []
    env = os.environ | {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}
    started = time.perf_counter()
    procs = []
    for i in range(jobs):
        out = folder / f"bench-{jobs}-{mode}-{amp}-{i}.json"
        procs.append((out, subprocess.Popen([sys.executable, str(REPO / "bench.py"), *flags, "--json", str(out)], cwd=REPO, env=env,
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))  # fmt: skip
    results, failures = [], []
    for out, proc in procs:
        try:
            output, _ = proc.communicate(timeout=max(1.0, started + args.group_timeout - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        if proc.returncode == 0 and out.is_file():
            results.append(json.loads(out.read_text())["pipelines"]["fast"])
        else:
            failures.append(f"exit {proc.returncode}: {output.strip().splitlines()[-1] if output.strip() else ''}")
    return {
        "jobs": jobs,
        "mode": mode,
        "amp": amp,
        "seconds": time.perf_counter() - started,
        "samples_per_s_sum": sum(r["samples_per_s"] for r in results) if not failures else None,
        "samples_per_s_each": [r["samples_per_s"] for r in results],
        "peak_memory_mib_each": [r["peak_memory_mib"] for r in results],
        "failures": failures,
    }


def measure(args: argparse.Namespace, log: Log) -> int:
    started = time.perf_counter()
    report = machine() | {"unpack_seconds": unpack(Path(args.archive), Path(args.data_dir), [DATA_SETS["mnist"]])}
    log(f"{report['gpu']}, torch {report['torch']}, {report['cpus']} CPUs; MNIST unpacked in {report['unpack_seconds']:.1f} s")
    if args.test_timeout > 0:
        t = time.perf_counter()
        command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_cuda.py"]
        try:
            proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=args.test_timeout)
            tail, rc = (proc.stdout + proc.stderr).strip().splitlines()[-1:], proc.returncode
        except subprocess.TimeoutExpired:
            tail, rc = [f"stopped after {args.test_timeout} s"], None
        report["test_cuda"] = {"exit": rc, "seconds": time.perf_counter() - t, "last_line": tail[0] if tail else ""}
        log(f"tests/test_cuda.py: exit {rc} in {report['test_cuda']['seconds']:.0f} s: {report['test_cuda']['last_line']}")
    folder = Path(args.out) / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    groups = []
    for entry in args.matrix.split():
        jobs, mode, amp = re.fullmatch(MATRIX_ENTRY, entry).groups()
        if time.perf_counter() - started + args.group_timeout > args.deadline:
            log(f"{entry}: skipped (would end past --deadline {args.deadline} s)")
            continue
        group = bench_group(args, int(jobs), mode, amp, folder)
        groups.append(group)
        total = group["samples_per_s_sum"]
        log(f"{entry}: " + (f"{total:.0f} samples/s summed ({', '.join(f'{s:.0f}' for s in group['samples_per_s_each'])})"
                            if total else f"failed ({'; '.join(group['failures'])})") + f", {group['seconds']:.0f} s")  # fmt: skip
    shutil.rmtree(folder)
    report["groups"] = groups
    fp32 = [g for g in groups if g["amp"] == "fp32" and g["samples_per_s_sum"]]
    best = max(fp32, key=lambda g: g["samples_per_s_sum"], default=None)
    grid = 6 * 100 * sum(GRID_SAMPLES.values())  # 18 runs at 100 epochs: 3 losses x 2 feature sizes per data set
    report["best_fp32"] = best
    report["grid_train_samples"] = grid
    if best:
        report["grid_seconds_estimate"] = grid / best["samples_per_s_sum"]
        report["call_2"] = f"python3 gpu_plan.py table --out $OUT --jobs {best['jobs']} --mode {best['mode']}"
        log(f"fastest float32: {best['jobs']} runs at once, {best['mode']}: {best['samples_per_s_sum']:.0f} samples/s; the grid's "
            f"{grid / 1e6:.0f} M train samples in about {report['grid_seconds_estimate'] / 60:.1f} min (MNIST-shaped steps, training only)")  # fmt: skip
        log(f"call 2: {report['call_2']}")
    report["seconds"] = time.perf_counter() - started
    (Path(args.out) / "measure.json").write_text(json.dumps(report, indent=2) + "\n")
    log.save(Path(args.out) / "measure.log")
    return 0 if best else 1


# ------------------------------------------------------------------------------------------ call 2


def grid(args: argparse.Namespace) -> dict[str, tuple[str, str, str]]:
    """reproduce.sh's run names, in its order, with their loss, data set and feature size."""
    runs = [(loss, d, f) for d in args.datasets.split() for f in args.feat_dims.split() for loss in args.losses.split()]
    return {f"{loss}-{d}-feat={f}": (loss, d, f) for loss, d, f in runs}


def epochs_done(run_dir: Path) -> int:
    """The last epoch in the run's metrics.csv (0 without one)."""
    try:
        with open(run_dir / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        return int(rows[-1]["epoch"]) if rows else 0
    except (OSError, KeyError, ValueError):
        return 0


def reproduce(args: argparse.Namespace, env: dict, flags: list[str], seconds: float, log: Log) -> int | None:
    """reproduce.sh in its own process group, SIGTERM at `seconds`; its exit code once every process of the group
    (the main.py runs too) has ended, those left after --grace killed."""
    proc = subprocess.Popen(["bash", str(REPO / "reproduce.sh"), *flags], cwd=REPO, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=max(0.0, seconds))
    except subprocess.TimeoutExpired:
        log(f"budget reached: SIGTERM to the runs (each saves a checkpoint), SIGKILL after {args.grace} s")
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.perf_counter() + args.grace
    while group_alive(proc.pid) and time.perf_counter() < deadline:
        proc.poll()  # reaps reproduce.sh itself, which would otherwise keep the group alive as a zombie
        time.sleep(0.5)
    if group_alive(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def group_alive(pgid: int) -> bool:
    """Whether a process of the process group is still there."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def draw_stopped(run_dir: Path, dataset: str, log: Log) -> list[Path]:
    """The frames and GIFs of a 2-D run stopped before main.py drew them, from its saved frame data."""
    import visualize
    from datasets import CIFAR10_CLASSES, DIGIT_CLASSES, FASHION_CLASSES

    classes = {"mnist": DIGIT_CLASSES, "fashion-mnist": FASHION_CLASSES, "cifar10": CIFAR10_CLASSES}[dataset]
    try:
        visualize.draw_frames(run_dir, classes, workers=os.cpu_count() or 1)
    except visualize.StitchError as exc:  # a frame cut short by SIGKILL: the run comes back without GIFs
        log(f"{run_dir.name}: no GIFs: {exc}")
        return []
    return visualize.make_run_gifs(run_dir)


def pack_back(out: Path, root: Path, members: list[Path], gifs: list[Path], limit: int, log: Log) -> list[str]:
    """gpu-100ep.tgz of `members`, and the GIFs in as few gifs-N.tgz as the file limits allow; the GIFs left out."""
    with tarfile.open(out / "gpu-100ep.tgz", "w:gz") as tar:
        for path in members:
            tar.add(path, arcname=str(path.relative_to(root)))
    used = sum(p.stat().st_size for p in out.iterdir() if p.is_file()) + 2**20  # table.json and table.log come after
    bins: list[list[Path]] = []
    sizes: list[int] = []
    left_out = []
    for gif in sorted(gifs, key=lambda p: -p.stat().st_size):  # GIFs barely compress: bins by their own sizes
        size = gif.stat().st_size + 4096
        fits = [i for i, s in enumerate(sizes) if s + size <= FILE_LIMIT - 2**20]
        if used + size > limit:
            left_out.append(str(gif.relative_to(root)))
        elif fits:
            bins[fits[0]].append(gif)
            sizes[fits[0]] += size
            used += size
        elif len(bins) < MAX_FILES - 3 and size <= FILE_LIMIT - 2**20:
            bins.append([gif])
            sizes.append(size)
            used += size
        else:
            left_out.append(str(gif.relative_to(root)))
    for i, members_of_bin in enumerate(bins, 1):
        with tarfile.open(out / f"gifs-{i}.tgz", "w:gz") as tar:
            for gif in members_of_bin:
                tar.add(gif, arcname=str(gif.relative_to(root)))
    if left_out:
        log(f"left out of $OUT (over the {MAX_FILES} files / {limit // 2**20} MiB that come back): {', '.join(left_out)}")
    return left_out


def table(args: argparse.Namespace, log: Log) -> int:
    started = time.perf_counter()
    out, root = Path(args.out), Path(args.root).resolve()
    runs, results, plan = root / args.runs, root / args.results, root / args.plan_dir
    names = grid(args)
    report = machine() | {"jobs": args.jobs, "mode": args.mode, "amp": args.amp, "epochs": args.epochs, "budget": args.budget}
    report["unpack_seconds"] = unpack(Path(args.archive), Path(args.data_dir), [DATA_SETS[d] for d in args.datasets.split()])
    threads = max(1, (report["cpus"] or 1) // args.jobs)
    flags = ["--device", args.device, "--amp", args.amp, *(["--cuda-graph"] if args.mode == "graph" else []), *args.main_args]
    report["main_flags"] = flags
    log(f"{report['gpu']}, torch {report['torch']}, {report['cpus']} CPUs; {len(names)} runs of {args.epochs} epochs, {args.jobs} at once, "
        f"OMP_NUM_THREADS={threads}, main.py flags: {' '.join(flags)}; data unpacked in {report['unpack_seconds']:.1f} s")  # fmt: skip
    env = os.environ | {"DATA_DIR": str(Path(args.data_dir).resolve()), "EPOCHS": str(args.epochs), "JOBS": str(args.jobs)}
    env |= {"OUT": str(runs), "PYTHON": sys.executable, "OMP_NUM_THREADS": str(threads), "LOSSES": args.losses}
    env |= {"DATASETS": args.datasets, "FEAT_DIMS": args.feat_dims}
    t = time.perf_counter()
    report["reproduce_exit"] = reproduce(args, env, flags, args.budget - (t - started), log)
    report["train_seconds"] = time.perf_counter() - t
    log(f"reproduce.sh: exit {report['reproduce_exit']} after {report['train_seconds']:.0f} s")
    t = time.perf_counter()
    unfinished_last = [n for n in names if not (runs / n / "summary.json").is_file() and epochs_done(runs / n) == args.epochs]
    finishing = []
    for name in unfinished_last:  # stopped while drawing its pictures: resume from the checkpoint of its last epoch
        loss, dataset, feat = names[name]
        single = env | {"LOSSES": loss, "DATASETS": dataset, "FEAT_DIMS": feat, "JOBS": "1"}
        finishing.append(subprocess.Popen(["bash", str(REPO / "reproduce.sh"), *flags], cwd=REPO, env=single, start_new_session=True))
    for proc in finishing:
        try:
            proc.wait(timeout=max(1.0, t + args.finish - time.perf_counter()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    report["finish_seconds"] = time.perf_counter() - t
    if unfinished_last:
        log(f"finished from their last checkpoint: {', '.join(unfinished_last)} in {report['finish_seconds']:.0f} s")
    t = time.perf_counter()
    statuses, gifs = {}, []
    for name, (_, dataset, feat) in names.items():
        run_dir = runs / name
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else None
        status = "finished" if summary else "unfinished" if epochs_done(run_dir) else "no epoch" if run_dir.is_dir() else "not started"
        statuses[name] = {"status": status, "epochs": summary["epochs"] if summary else epochs_done(run_dir)}
        if summary:
            statuses[name] |= {k: summary.get(k) for k in ("acc", "samples_per_second", "peak_gpu_memory_mb", "train_seconds")}
        if feat == "2" and status in ("finished", "unfinished"):
            made = sorted(run_dir.glob("*.gif")) if summary else draw_stopped(run_dir, dataset, log)
            target = root / (args.imgs if summary else f"{args.imgs}-unfinished") / name
            target.mkdir(parents=True, exist_ok=True)
            for gif in made:
                shutil.copyfile(gif, target / gif.name)
                gifs.append(target / gif.name)
    report["frames_seconds"] = time.perf_counter() - t
    report["runs"] = statuses
    memory = [s.get("peak_gpu_memory_mb") for s in statuses.values() if s.get("peak_gpu_memory_mb") is not None]
    report["peak_gpu_memory_mb_max"] = max(memory, default=None)
    report["samples_per_second_sum"] = sum(s.get("samples_per_second") or 0 for s in statuses.values())
    for status in ("finished", "unfinished", "no epoch", "not started"):
        chosen = [f"{n} ({s['epochs']})" if status == "unfinished" else n for n, s in statuses.items() if s["status"] == status]
        log(f"{status}: {len(chosen)}" + (f": {', '.join(chosen)}" if chosen and status != "finished" else ""))
    present = [runs / n for n in names if statuses[n]["status"] in ("finished", "unfinished")]
    if present:
        columns = "samples_per_second,peak_gpu_memory_mb,clean_train_acc,gap"
        command = [sys.executable, "report.py", *map(str, present), "--collect", str(results), "--columns", columns, "--present"]
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        log(proc.stdout.strip() + (f"\nreport.py: {proc.stderr.strip()}" if proc.returncode else ""))
    report["seconds_before_packing"] = time.perf_counter() - started
    plan.mkdir(parents=True, exist_ok=True)
    (plan / "table.json").write_text(json.dumps(report, indent=2) + "\n")
    members = sorted(results.glob("*.json")) + sorted(plan.glob("*")) + sorted(runs.glob("*.log"))
    members += [f for n in names for f in (runs / n / "args.json", runs / n / "metrics.csv") if f.is_file()]
    report["gifs_left_out"] = pack_back(out, root, members, gifs, DEVICE_LIMIT, log)
    report["seconds"] = time.perf_counter() - started
    log(f"whole call: {report['seconds']:.0f} s; back in $OUT: {', '.join(sorted(p.name for p in out.iterdir()))}")
    (out / "table.json").write_text(json.dumps(report, indent=2) + "\n")
    log.save(out / "table.log")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="table: flags after -- go to every main.py run (e.g. -- --train-samples 256 for a dry run)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("part", choices=("pack", "measure", "table"))
    p.add_argument("--archive", default=ARCHIVE, help="the data archive (pack writes it; the calls carry and unpack it)")
    p.add_argument(
        "--data-dir", default=None, help="pack: the data sets' folder (../shared/data); calls: where to unpack (/tmp/gpu-plan-data)"
    )
    p.add_argument("--out", default=os.environ.get("OUT"), help="the folder that goes back ($OUT of the device call)")
    p.add_argument("--device", default="cuda", help="main.py's and bench.py's --device (cpu for a dry run)")
    p.add_argument("--matrix", default=MATRIX, help="measure: JOBS:MODE-AMP entries, MODE eager or graph, AMP fp32 or bf16")
    p.add_argument("--steps", type=int, default=100, help="measure: bench.py --steps (timed steps per round)")
    p.add_argument("--rounds", type=int, default=3, help="measure: bench.py --rounds")
    p.add_argument("--warmup", type=int, default=20, help="measure: bench.py --warmup")
    p.add_argument("--startup", type=float, default=8.0, help="measure: seconds from launch to the timed rounds ...")
    p.add_argument("--startup-per-job", type=float, default=0.4, help="measure: ... plus this per process launched together")
    p.add_argument("--group-timeout", type=float, default=40.0, help="measure: seconds one matrix entry may take")
    p.add_argument("--test-timeout", type=float, default=30.0, help="measure: seconds for tests/test_cuda.py (0: skip it)")
    p.add_argument("--deadline", type=float, default=110.0, help="measure: no matrix entry starts that could end after this")
    p.add_argument("--jobs", type=int, default=18, help="table: runs at once (measure's choice)")
    p.add_argument("--mode", choices=("graph", "eager"), default="graph", help="table: graph adds main.py --cuda-graph")
    p.add_argument("--amp", choices=("off", "bf16"), default="off", help="table: main.py --amp (the study's settings: off, float32)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--budget", type=float, default=390.0, help="table: seconds from the call's start to the SIGTERM")
    p.add_argument("--grace", type=float, default=20.0, help="table: seconds the runs get to save a checkpoint after the SIGTERM")
    p.add_argument("--finish", type=float, default=30.0, help="table: seconds to finish runs stopped after their last epoch")
    p.add_argument("--losses", default="xent cent standalone", help="table: reproduce.sh's LOSSES")
    p.add_argument("--datasets", default=" ".join(DATA_SETS), help="table: reproduce.sh's DATASETS")
    p.add_argument("--feat-dims", default="2 128", help="table: reproduce.sh's FEAT_DIMS")
    p.add_argument("--root", default=str(REPO), help="table: the folder that holds --runs, --results, --plan-dir and --imgs")
    p.add_argument("--runs", default="runs/gpu-100ep", help="table: the run folders, under --root")
    p.add_argument("--results", default="results/gpu-100ep", help="table: report.py --collect's folder, under --root")
    p.add_argument("--plan-dir", default="results/gpu-plan", help="table: where table.json is kept, under --root")
    p.add_argument(
        "--imgs", default="imgs", help="table: finished 2-D runs' GIFs go to <imgs>/<run>/, stopped ones' to <imgs>-unfinished/<run>/"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)  # table: extra main.py flags for every run come after --
    args = parser.parse_args(argv[:split])
    args.main_args = argv[split + 1 :]
    if args.part == "pack":
        args.data_dir = args.data_dir or str(REPO.parent / "shared" / "data")
        missing = [f for f in DATA_SETS.values() if not (Path(args.data_dir) / f).is_dir()]
        if missing:
            parser.error(f"--data-dir {args.data_dir} has no {', '.join(missing)}; give the folder with the three data sets")
        return pack(args, Log())
    args.data_dir = args.data_dir or "/tmp/gpu-plan-data"
    if not args.out:
        parser.error("--out (or OUT) must name the folder that goes back: --out $OUT")
    if args.jobs < 1 or args.epochs < 1 or min(args.steps, args.rounds) < 1 or not math.isfinite(args.budget):
        parser.error("--jobs, --epochs, --steps and --rounds must be at least 1")
    wrong = [entry for entry in args.matrix.split() if not re.fullmatch(MATRIX_ENTRY, entry)]
    if wrong:
        parser.error(f"--matrix: {' '.join(wrong)} is not JOBS:MODE-AMP with MODE eager or graph and AMP fp32 or bf16 (e.g. 6:graph-fp32)")
    unknown = [d for d in args.datasets.split() if d not in DATA_SETS]
    if unknown:
        parser.error(f"--datasets: {', '.join(unknown)} is not in the archive ({', '.join(DATA_SETS)})")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return measure(args, Log()) if args.part == "measure" else table(args, Log())


if __name__ == "__main__":
    sys.exit(main())
