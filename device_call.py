#!/usr/bin/env python3
"""One device call, no state kept between calls: the MNIST grid (3 losses x 2 feature sizes) a piece at a time.

  python device_call.py pack [--data-dir ../shared/data]    # here: .device-data/mnist.tar.gz, wheels/
  python3 device_call.py run [--per-call E] [main.py flags]  # there: $OUT set, .device-data carried
  python device_call.py unpack DIR                           # here: DIR, what came back -> .device-data
  python device_call.py rehearse [--data-dir D] [--out O]    # here, on the CPU: pack, run, unpack, run

A call trains each unfinished run E more epochs (SIGTERM once metrics.csv has the epoch; main.py saves a
checkpoint and exits 143), or until --budget less GRACE seconds have passed, and writes into $OUT 8
files at most, each under 16 MiB: table.md (report.py's table of the runs with an epoch, then how far
each run got), call.log, cuda-tests.log (tests/test_cuda.py, first call only), runs.tar.gz (the run
folders but checkpoints) and state-N.tar (whole run folders, at most PART bytes each), from which the
next call continues. POSIX only (process groups). docs/speed.md: the plan and why these sizes.
"""

import argparse
import contextlib
import csv
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RAW = [f"{s}-{k}-ubyte" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
MiB = 2**20
PART = 15 * MiB  # a state archive at most: the device tool brings back files of up to 16 MiB
LIMITS = (8, 16 * MiB, 64 * MiB, re.compile(r"[A-Za-z0-9._-]+"))  # files, one, all, a name
GRACE = 45  # seconds a call keeps after its runs' deadline: checkpoints, table, archives
PIP = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
INTERRUPTED: list[int] = []  # the signals that stopped a call's runs before their time
# the data filter where this Python has one (3.12, 3.11.4, 3.10.12)
DATA_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
PYTEST = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "tests/test_cuda.py"]


class Refused(Exception):
    """One line for the user, exit code 1."""


def rows(run: Path) -> list[dict]:
    metrics = run / "metrics.csv"
    return list(csv.DictReader(metrics.read_text().splitlines())) if metrics.is_file() else []


def extract(path: Path, dest: Path | None = None) -> None:
    """Check that path is a whole tar archive of plain files and folders inside it; then extract it."""
    try:
        with tarfile.open(path) as tar:
            for m in tar:
                if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in m.name:
                    raise Refused(f"{path}: holds {m.name!r}, not a plain path; nothing changed")
            if dest:
                tar.extractall(dest, **DATA_FILTER)
    except (OSError, EOFError, tarfile.TarError) as exc:
        first = str(exc).splitlines()[0]
        raise Refused(f"{path}: not a whole tar archive ({first}); nothing changed") from None


def write_atomic(target: Path, write) -> None:
    """write(temporary path), renamed to target; nothing half-written is left where write fails."""
    part = target.with_name(f".{target.name}.part")
    try:
        write(part)
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)


def pack(data_dir: Path, state: Path, wheel: bool = True) -> None:
    raw = data_dir / "MNIST" / "raw"
    if missing := [name for name in RAW if not (raw / name).is_file()]:
        raise Refused(f"{raw / missing[0]} not found: give --data-dir the folder with MNIST/raw")
    state.mkdir(parents=True, exist_ok=True)

    def archive(part: Path) -> None:
        with tarfile.open(part, "w:gz") as tar:
            for name in RAW:
                tar.add(raw / name, f"MNIST/raw/{name}")

    write_atomic(state / "mnist.tar.gz", archive)
    if wheel:  # metrics.py needs pytorch-metric-learning, which the device lacks (pure Python)
        with tempfile.TemporaryDirectory(dir=state, prefix=".wheels-") as got:
            pml = ["--no-deps", "--only-binary=:all:", "-d", got, "pytorch-metric-learning>=2.3"]
            pip = subprocess.run([*PIP, "download", *pml], capture_output=True)
            if pip.returncode or not list(Path(got).glob("*.whl")):
                raise Refused("pip could not download the pytorch-metric-learning wheel; try again")
            shutil.rmtree(state / "wheels", ignore_errors=True)
            os.replace(got, state / "wheels")  # the temporary folder's removal then finds nothing
    print(f"{state}: " + ", ".join(p.name for p in sorted(state.iterdir())))


def unpack(came_back: Path, state: Path) -> None:
    """The state archives that came back replace those in state, each checked first."""
    if not (parts := sorted(came_back.glob("state-*.tar"))):
        raise Refused(f"{came_back}: no state-*.tar, the files a call brings back; nothing changed")
    for part in parts:
        extract(part)
    for part in parts:
        write_atomic(state / part.name, lambda tmp, part=part: shutil.copyfile(part, tmp))
    for old in set(state.glob("state-*.tar")) - {state / p.name for p in parts}:
        old.unlink()  # a part the last call needed and this one did not write
    print(f"{state}: {', '.join(p.name for p in parts)}; the next call continues from them")


def start(command: list[str], log: Path, **popen) -> subprocess.Popen:
    """command in a process group of its own (stop() reaches its children), output appended to log."""
    with open(log, "a") as file:  # the child keeps its own copy of the file
        file.write(f"== {time.strftime('%F %T', time.gmtime())} {' '.join(command[1:])}\n")
        file.flush()
        return subprocess.Popen(command, stdout=file, stderr=file, preexec_fn=os.setpgrp, **popen)


def stop(proc: subprocess.Popen, how: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, how)


def train(runs: Path, commands: dict, args, env: dict, deadline: float) -> dict:
    """Each run up to args.per_call more epochs or the deadline: {name: (epochs before, exit, why)}.
    SIGTERM or SIGINT to this process brings the deadline forward to now."""
    procs, status, signalled, now = {}, {}, {}, [deadline]

    def deadline_now(signum, frame) -> None:
        now[0] = min(now[0], time.monotonic())
        INTERRUPTED.append(signum)

    previous = {how: signal.signal(how, deadline_now) for how in (signal.SIGTERM, signal.SIGINT)}
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // len(commands)))} | env
    for name, command in commands.items():
        before = len(rows(runs / name))
        if (runs / name / "summary.json").is_file():
            status[name] = (before, 0, "finished before")
            continue
        main = [sys.executable, str(ROOT / "main.py"), *command]
        proc = start(main, runs / f"{name}.log", cwd=runs.parent, env=env)
        stop_at = before + args.per_call if before + args.per_call < args.epochs else None
        procs[name] = (proc, before, stop_at)  # the last piece is not stopped: main.py finishes it
    while procs:
        time.sleep(0.2)
        late = time.monotonic() > now[0]
        for name, (proc, before, stop_at) in list(procs.items()):
            if proc.poll() is not None:
                status[name] = (before, proc.returncode, signalled.get(name, "ended"))
                del procs[name]
            elif name not in signalled and (late or stop_at and len(rows(runs / name)) >= stop_at):
                signalled[name] = "deadline" if late else "piece done"
                stop(proc, signal.SIGTERM)  # main.py saves a checkpoint and exits 143
            elif time.monotonic() > now[0] + GRACE - 15:
                stop(proc, signal.SIGKILL)  # the checkpoint of its last epoch stays
    for how, handler in previous.items():
        signal.signal(how, handler)
    return status


def prepare(state: Path, work: Path, parts: list[Path]) -> dict:
    """MNIST and the last call's runs unpacked in work; the environment, with the wheel if needed."""
    extract(state / "mnist.tar.gz", work / "data")
    for part in parts:
        extract(part, work)
    (work / "runs").mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if importlib.util.find_spec("pytorch_metric_learning") is None:
        wheels = [str(p) for p in sorted((state / "wheels").glob("*.whl"))]
        site = str(work / "site")
        pip = ["install", "--no-index", "--no-deps", "--target", site, *wheels]
        if not wheels or subprocess.run([*PIP, *pip], capture_output=True).returncode:
            raise Refused(f"{state}/wheels: no pytorch-metric-learning wheel that installs")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH")]))
    return env


def progress(runs: Path, status: dict, epochs: int) -> str:
    """A row per run: its epochs, what this call added and why it stopped, exit code, median seconds."""
    table = ["| run | epochs | this call | exit | train s per epoch |", "|---|---|---|---|---|"]
    for name, (before, code, why) in status.items():
        done, end = rows(runs / name), " (finished)" * (runs / name / "summary.json").is_file()
        new = sorted(float(row["seconds"]) for row in done[before:])
        median = f"{new[len(new) // 2]:.1f}" if new else "/"
        count = f"{len(done)} of {epochs}{end}"
        table.append(f"| {name} | {count} | +{len(done) - before}, {why} | {code} | {median} |")
    return "\n".join(table)


def call(args, extra: list[str]) -> int:
    started, out, state = time.monotonic(), Path(args.out or os.environ.get("OUT", "")), args.state
    if not out.name or not out.is_dir():
        raise Refused("set OUT (or --out) to the existing folder whose files come back")
    if not (state / "mnist.tar.gz").is_file():
        raise Refused(f"{state}/mnist.tar.gz not found: run 'python device_call.py pack' here")
    for part in (parts := sorted(state.glob("state-*.tar"))):
        extract(part)
    work, lines = Path(tempfile.mkdtemp(prefix="device-call-")), []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    try:
        env, runs = prepare(state, work, parts), work / "runs"
        query = ["--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        smi = shutil.which("nvidia-smi")
        gpu = smi and subprocess.run([smi, *query], capture_output=True, text=True).stdout.strip()
        say(f"gpu: {gpu or 'nvidia-smi: none'}; python {sys.version.split()[0]}")
        tested, tests = time.monotonic(), args.test_timeout
        if tests if tests is not None else not parts:  # by default in the first call alone
            proc = start(PYTEST, out / "cuda-tests.log", cwd=ROOT, env=env)
            try:
                code = proc.wait(tests or 120)
            except subprocess.TimeoutExpired:
                code = f"killed at {tests or 120} s"
            finally:  # also on Ctrl-C: nothing of the tests is left running
                stop(proc, signal.SIGKILL)
            last = (out / "cuda-tests.log").read_text().strip().splitlines()[-1]
            say(f"tests/test_cuda.py: exit {code}: {last.strip('= ')}")
        launched, commands = time.monotonic(), {}
        for d, loss in ((d, loss) for d in args.feat_dims.split() for loss in args.losses.split()):
            flags = f"--loss {loss} --dataset mnist --data-dir data --feat-dim {d} --epochs {args.epochs}"
            name = f"{loss}-mnist-feat={d}"
            commands[name] = [*flags.split(), "--out", "runs", "--no-plots", *extra, "--name", name]
        status = train(runs, commands, args, env, started + args.budget - GRACE)
        trained = time.monotonic() - launched
        if advanced := max(len(rows(runs / n)) - status[n][0] for n in status):
            setup = tested - started  # every call's unpacking; the tests are the first call's alone
            fits = int((args.budget - GRACE - setup) * advanced / trained)
            took = f"+{advanced} in {trained:.0f} s, all runs at once, after {setup:.0f} s of unpacking"
            say(f"epochs: {took}: --per-call {fits} fills a call")
        ready = [str(runs / n) for n in status if rows(runs / n)]
        columns = "ncm_acc,clean_train_acc,gap" if list(runs.glob("*/summary.json")) else "ncm_acc"
        cmd = [sys.executable, str(ROOT / "report.py"), "--present", "--columns", columns, *ready]
        text = "no run has an epoch\n"
        if ready:
            report = subprocess.run(cmd, capture_output=True, text=True, env=env)
            text = report.stderr if report.returncode else report.stdout
        (out / "table.md").write_text(f"{text}\n{progress(runs, status, args.epochs)}\n")
        say(f"{text}{progress(runs, status, args.epochs)}")
        archive(runs, list(status), out)
        bad = [n for n, (_, code, _) in status.items() if code not in (0, 143)]
        for name in bad:
            say(f"FAILED {name}: {(runs / f'{name}.log').read_text().strip().splitlines()[-1]}")
        broken = contract(out) + [f"{len(bad)} run(s) FAILED, logs in runs.tar.gz"] * bool(bad)
        broken += ["the runs were stopped by a signal"] * bool(INTERRUPTED)
        say(f"elapsed {time.monotonic() - started:.0f} s; " + ("; ".join(broken) or "limits kept"))
        return 1 if broken or (ready and report.returncode) else 0
    finally:
        (out / "call.log").write_text("\n".join(lines) + "\n")
        shutil.rmtree(work, ignore_errors=True)


def leave_out(*names: str):
    """A tarfile filter that leaves out the files of these names."""
    return lambda member: None if Path(member.name).name in names else member


def archive(runs: Path, names: list[str], out: Path) -> None:
    """runs.tar.gz: the run folders but checkpoints; state-N.tar: whole run folders, PART bytes each at most."""
    with tarfile.open(out / "runs.tar.gz", "w:gz") as tar:
        tar.add(runs, "runs", filter=leave_out("checkpoint.pt", ".lock"))
    size = {n: sum(f.stat().st_size for f in (runs / n).rglob("*")) for n in names}
    groups: list[list[str]] = []
    for name in sorted(names, key=size.get, reverse=True):  # first fit, the largest first
        fit = [g for g in groups if sum(map(size.get, g)) + size[name] <= PART]
        fit[0].append(name) if fit else groups.append([name])
    for k, group in enumerate(groups, 1):
        with tarfile.open(out / f"state-{k}.tar", "w") as tar:
            for path in (runs / f for name in group for f in (name, f"{name}.log")):
                if path.exists():  # a run refused at its start made no folder
                    tar.add(path, f"runs/{path.name}", filter=leave_out(".lock"))


def contract(out: Path) -> list[str]:
    """The device tool's limits on what comes back from $OUT that out breaks, a phrase each."""
    count, one, total, name = LIMITS
    found = [p.relative_to(out) for p in out.rglob("*")]
    sizes = [(out / p).stat().st_size for p in found if (out / p).is_file()]
    problems = {
        f"{len(sizes)} files (at most {count})": len(sizes) > count,
        f"a file over {one // MiB} MiB": any(s > one for s in sizes),
        f"{sum(sizes) / MiB:.1f} MiB (at most {total // MiB})": sum(sizes) > total,
        "a name not of [A-Za-z0-9._-]": any(not name.fullmatch(p.name) for p in found),
        "a file more than 2 folders down": any(len(p.parts) > 3 for p in found),
    }
    return [problem for problem, broken in problems.items() if broken]


def rehearse(args, extra: list[str]) -> int:
    """pack, a call into OUT/call-1, unpack, a call into OUT/call-2: on the CPU, nvidia-smi stood in for."""
    out = Path(args.out or os.environ.get("OUT", "rehearsal"))
    if (out / "call-1").exists() or (out / "call-2").exists():
        raise Refused(f"{out} holds call-1 or call-2 already: give --out a new or empty folder")
    with tempfile.TemporaryDirectory(prefix="device-rehearsal-") as tmp:
        smi = Path(tmp) / "nvidia-smi"
        smi.write_text(f"#!{sys.executable}\nprint('stand-in, 0 MiB')\n")
        smi.chmod(0o755)
        os.environ["PATH"] = f"{tmp}{os.pathsep}{os.environ['PATH']}"
        pack(Path(args.data_dir), state := Path(tmp) / "state", wheel=False)  # this Python has it
        tiny = "--device cpu --model lenet++ --train-samples 64 --batch-size 32".split()
        codes = []
        for k in (1, 2):
            (call_out := out / f"call-{k}").mkdir(parents=True)
            call_args = argparse.Namespace(**vars(args) | {"out": call_out, "state": state})
            codes.append(call(call_args, tiny + extra))
            if INTERRUPTED:
                raise KeyboardInterrupt
            if k == 1:
                unpack(call_out, state)
    return max(codes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("command", choices=("pack", "run", "unpack", "rehearse"))
    add("came_back", nargs="?", type=Path, help="unpack: the folder a call brought back")
    add("--state", type=Path, default=ROOT / ".device-data", help="what travels (git ignores it)")
    add("--data-dir", default=ROOT.parent / "shared" / "data", help="the folder with MNIST/raw")
    add("--out", help="run, rehearse: instead of $OUT")
    add("--epochs", type=int, help="each run's epochs in all (35; rehearse: 2)")
    add("--per-call", type=int, help="epochs a call adds to each run (12; rehearse: 1)")
    add("--budget", type=int, default=300, help="seconds a call takes at most (300)")
    add("--test-timeout", type=int, help="tests/test_cuda.py's seconds, 0: none (first call: 120)")
    add("--losses", help="the grid's losses ('xent cent standalone'; rehearse: 'xent standalone')")
    add("--feat-dims", help="the grid's feature sizes ('2 128'; rehearse: '2')")
    args, extra = parser.parse_known_args(argv)
    small = args.command == "rehearse"
    grid = {"epochs": (35, 2), "per_call": (12, 1), "feat_dims": ("2 128", "2")}
    for key, defaults in (grid | {"losses": ("xent cent standalone", "xent standalone")}).items():
        if getattr(args, key) is None:
            setattr(args, key, defaults[small])
    if min(args.epochs, args.per_call) < 1 or args.budget < GRACE + 30:
        parser.error(f"--epochs, --per-call must be positive, --budget at least {GRACE + 30} s")
    if extra and args.command in ("pack", "unpack"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if (args.came_back is None) == (args.command == "unpack"):
        parser.error("unpack takes the folder a call brought back, and only unpack takes a folder")
    try:
        if args.command == "pack":
            pack(Path(args.data_dir), args.state)
        elif args.command == "unpack":
            unpack(args.came_back, args.state)
        elif os.name != "posix":  # process groups: stop() must reach main.py's workers too
            raise Refused(f"{args.command} needs a POSIX system (Linux, macOS; on Windows, WSL)")
        else:
            return (rehearse if small else call)(args, extra)
    except Refused as exc:
        print(f"device_call.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM outside the training, which stops the runs itself
        sys.stderr.write("device_call.py: error: interrupted; the temporary folder is removed\n")
        return 130
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
