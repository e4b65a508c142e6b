"""Interruption, exact resume, damaged checkpoints and the divergence guard: real signals, raised in
this process at chosen moments or sent to a process of its own; the rest in-process."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import Mock

import pytest
import torch
from conftest import metrics_without_seconds, stderr_error_line, subprocess_env, write_image_tree

import epoch
import main as main_module
from checkpoints import CHECKPOINT_KEYS, LEGACY_CONFIG, CheckpointError, checkpoint, load_checkpoint
from config import parse_args
from datasets import ImageData
from epoch import TrainingError, check_divergence
from losses import Objective, paper_center_update
from main import STARTUP_INTERRUPT, finish, main
from training import EpochState, Trainer, build_trainer, train_step

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6  # an epoch of TINY
TINY = "--dataset digits --train-samples 192 --batch-size 32 --epochs 2 --no-plots --model lenet++"
TINY = TINY.split()


def main_code(args: list[str]) -> int:
    """main(args)'s exit code, argparse's refusals (SystemExit) included."""
    try:
        return main(args)
    except SystemExit as exc:
        return exc.code


def start(args: list[str]) -> subprocess.Popen:
    """main.py in a process of its own, on one thread as in-process runs (equal results)."""
    command, env = [sys.executable, "main.py", *args], subprocess_env()
    return subprocess.Popen(command, cwd=ROOT, stdout=-1, stderr=-1, text=True, env=env)


def assert_same_run(a: Path, b: Path) -> None:
    """Same metrics but the seconds; bit for bit the same weights, centers, momentum, rate."""
    assert metrics_without_seconds(a) == metrics_without_seconds(b)
    ckpts = [torch.load(r / "checkpoint.pt", weights_only=True) for r in (a, b)]
    parts = [(c["model"], c["objective"], c["optimizer"]["state"]) for c in ckpts]
    assert len(parts[0][2]) > 5  # momentum buffers
    torch.testing.assert_close(*parts, rtol=0, atol=0)  # bit for bit
    assert len({c["optimizer"]["param_groups"][0]["lr"] for c in ckpts}) == 1


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """flags -> a finished uninterrupted TINY run with them, trained once for the module."""
    runs = {}

    def get(flags: str = "") -> Path:
        if flags not in runs:
            out = tmp_path_factory.mktemp("ref")
            assert main([*TINY, *flags.split(), "--out", str(out), "--name", "full"]) == 0
            runs[flags] = out / "full"
        return runs[flags]

    return get


INTERRUPTED = {
    "step": "interrupted at epoch 2 step 3; checkpoint saved, run the same command to resume",
    "evaluation": "interrupted after epoch 1's training (during its evaluation or writing); its "
    "checkpoint is saved, run the same command to resume",
    "summary": "interrupted while drawing the final pictures and writing summary.json; the "
    "checkpoint of epoch 2 is saved, run the same command to finish the run",
}
# where: (module, function, the call before which the signal is raised)
MOMENTS = {
    "step": (epoch, "record_step", STEPS + 3),
    "evaluation": (main_module, "epoch_row", 1),
    "summary": (main_module, "run_summary", 1),
}
SIGNAL_ROWS = [  # (signal, where, flags); Windows has no SIGHUP (a closed terminal)
    ("SIGTERM", "step", ""),
    ("SIGINT", "step", ""),
    ("SIGHUP", "evaluation", ""),
    ("SIGINT", "summary", ""),
    ("SIGTERM", "step", "--center-update paper"),  # the centers travel outside the optimizer
]


@pytest.mark.parametrize(
    ("name", "where", "flags"), [row for row in SIGNAL_ROWS if hasattr(signal, row[0])]
)
def test_a_signal_saves_a_checkpoint_and_the_same_command_resumes_bit_for_bit(
    tmp_path: Path, reference, monkeypatch, capsys, name: str, where: str, flags: str
) -> None:
    """A signal mid-epoch, during an epoch's evaluation or in the final summary: exit 128 + signal,
    one line saying what is saved, no summary; the same command resumes and ends like the
    uninterrupted run, having moved the weights and centers since the checkpoint."""
    sig = getattr(signal, name)
    module, function, call = MOMENTS[where]
    original, calls = getattr(module, function), []

    def signalled(*args, **kwargs):
        calls.append(None)
        if len(calls) == call:
            signal.raise_signal(sig)
        return original(*args, **kwargs)

    args = [*TINY, *flags.split(), "--out", str(tmp_path), "--name", "cut"]
    monkeypatch.setattr(module, function, signalled)
    assert main(args) == 128 + sig
    assert capsys.readouterr().err.strip() == INTERRUPTED[where]
    monkeypatch.undo()
    cut = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert not (tmp_path / "cut" / "summary.json").exists()
    assert main(args) == 0
    assert "resuming" in capsys.readouterr().out
    assert_same_run(reference(flags), tmp_path / "cut")
    end = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    for part, key in (("model", "body.0.weight"), ("objective", "criterion.centers")):
        assert torch.equal(cut[part][key], end[part][key]) == (where == "summary"), key


def test_sigkill_then_sigterm_to_a_process_leave_checkpoints_that_resume_bit_for_bit(
    tmp_path: Path, reference
) -> None:
    """main.py in a process of its own gets SIGKILL in epoch 2, which no handler sees: the atomic
    write (temp file, fsync, rename) keeps the last checkpoint whole; the same command resumes and
    gets SIGTERM (exit 143, a loadable checkpoint, no summary). The same command then ends like the
    uninterrupted run."""
    args = [*TINY, "--out", str(tmp_path), "--name", "cut"]
    for sig, code, after in ((signal.SIGKILL, -9, "epoch 1/"), (signal.SIGTERM, 143, "standalone")):
        proc = start(args)
        next(line for line in proc.stdout if line.startswith(after))
        proc.send_signal(sig)
        proc.communicate(timeout=300)
        assert proc.returncode == code
        torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
        assert not (tmp_path / "cut" / "summary.json").exists()
    assert main(args) == 0
    assert_same_run(reference(), tmp_path / "cut")


def contents(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes, but the lock files (any command takes them)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in (".lock", ".lock.pid")
    }


DAMAGES = {  # what is done to a copy of an unfinished run's checkpoint
    "": lambda c: c,
    "list": lambda c: list(c),
    "epoch_state without sums": lambda c: {**c, "epoch_state": {"step": 3}},
    "args a list": lambda c: {**c, "args": ["loss"]},
    "epoch 2.5": lambda c: {**c, "epoch": 2.5},
    "optimizer without groups": lambda c: {**c, "optimizer": {"state": {}}},
    "random of None": lambda c: {**c, "random": {"torch": None}},
}
for part in ("scheduler", "random", "epoch_state"):
    DAMAGES[f"no {part}"] = lambda c, part=part: {k: v for k, v in c.items() if k != part}
MALFORMED = "incomplete or damaged checkpoint (missing or malformed: "
REFUSALS = [  # (flags, damage, exit code, part of the error line)
    ("", "finished", 2, "holds a finished run; use --overwrite to replace it or --name"),
    ("--resume", "no run", 2, "holds no checkpoint.pt to resume from"),
    ("", "half the bytes", 1, "checkpoint.pt: corrupt or unreadable checkpoint ("),
    ("", "list", 1, MALFORMED + "all of it (not a dictionary)); delete it or start"),
    ("", "no scheduler", 1, MALFORMED + "scheduler)"),
    ("", "no random", 1, MALFORMED + "random)"),
    ("", "no epoch_state", 1, MALFORMED + "epoch_state)"),
    ("", "epoch_state without sums", 1, MALFORMED + "epoch_state.loss_sums"),
    ("", "args a list", 1, MALFORMED + "args)"),
    ("", "epoch 2.5", 1, MALFORMED + "epoch)"),
    ("", "optimizer without groups", 1, "checkpoint does not fit this run (KeyError"),
    ("", "random of None", 1, "checkpoint does not fit this run (TypeError"),
    ("--lr 0.02", "", 1, "(--lr 0.01, this run --lr 0.02); resume with --lr 0.01, or"),
    ("--lr-cent 0.5", "", 1, "(--lr-cent 0.01, this run --lr-cent 0.5)"),
    ("--momentum 0.5", "", 1, "(--momentum 0.9, this run --momentum 0.5)"),
    ("--patience 5", "", 1, "(--patience 3, this run --patience 5)"),
    ("--amp bf16", "", 1, "(--amp off, this run --amp bf16)"),
    # another --channels-last left the momentum buffers in the saved layout
    ("--no-channels-last", "", 1, "(--channels-last, this run --no-channels-last)"),
    ("--compile", "", 1, "(no --compile, this run --compile default)"),
    ("--model resnet", "", 1, "(--model lenet++, this run --model resnet)"),
    ("--loss cent", "", 1, "(--loss standalone, this run --loss cent)"),
    ("--seed 1", "", 1, "(--seed 0, this run --seed 1)"),
    ("--val-fraction 0.1", "", 1, "(--val-fraction 0.0, this run --val-fraction 0.1)"),
    ("--weight-decay 0", "", 1, "(--weight-decay 0.0005, this run --weight-decay 0.0)"),
    ("--inter-margin 1", "", 1, "(no --inter-margin, this run --inter-margin 1.0)"),
    ("--pipeline loader", "", 1, "(--pipeline fast, this run --pipeline loader)"),
    ("--epochs 1", "", 2, "has already trained 2 epochs; resume with --epochs 2 or more"),
]


@pytest.mark.parametrize(("flags", "damage", "code", "message"), REFUSALS)
def test_a_resume_that_cannot_continue_the_run_is_one_line_and_touches_nothing(
    tmp_path: Path, reference, capsys, flags: str, damage: str, code: int, message: str
) -> None:
    """A finished run (without --overwrite), --resume with no checkpoint, a damaged checkpoint, or
    any setting but the few that cannot change the numbers (checkpoints.FREE_KEYS) other than the
    checkpoint's (a flag added later included): one line, exit 1 (2 for a usage error), and
    everything under --out byte for byte as it was."""
    run_dir = tmp_path / "unfinished"
    ckpt = run_dir / "checkpoint.pt"
    if damage != "no run":
        shutil.copytree(reference(), run_dir)
    if damage != "finished":
        (run_dir / "summary.json").unlink(missing_ok=True)
    if damage == "half the bytes":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif damage in DAMAGES:
        saved = torch.load(ckpt, weights_only=True)
        assert set(saved) == {*CHECKPOINT_KEYS, "data"}  # data: the fingerprint, older ones lack it
        torch.save(DAMAGES[damage](saved), ckpt)
    before, args = contents(tmp_path), ["--out", str(tmp_path), "--name", "unfinished"]
    assert main_code([*TINY, *args, *flags.split()]) == code
    line = stderr_error_line(capsys.readouterr().err)
    assert message in line and str(run_dir if code == 2 else ckpt) in line
    assert contents(tmp_path) == before


def test_resume_with_more_epochs_extends_the_run(tmp_path: Path, reference) -> None:
    """More --epochs extend the run, and the flags that cannot change its numbers may change too."""
    run_dir = tmp_path / "unfinished"
    shutil.copytree(reference(), run_dir, ignore=shutil.ignore_patterns("summary.json"))
    free = "--device cpu --eval-every 2 --max-bad-steps 9 --tensorboard --threads 1".split()
    args = [*TINY, "--out", str(tmp_path), "--name", "unfinished", "--epochs", "3"]
    assert main([*args, *free]) == 0
    rows = metrics_without_seconds(run_dir)
    assert len(rows) == 3 and rows[:2] == metrics_without_seconds(reference())
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 3


IMAGES = ImageData(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.arange(4))
# what checkpoint() and load_checkpoint() read of a run besides its trainer and args
STATE = dict(device=torch.device("cpu"), history=[], train_seconds=0.0, samples=0, bad_steps=0)
STATE |= dict(train=IMAGES, test=IMAGES)


def saved_run(flags: tuple[str, ...] = (), **state) -> SimpleNamespace:
    """A run as checkpoint() and load_checkpoint() see it: trainer(flags) under --seed 3's args."""
    run = SimpleNamespace(**STATE | state, args=parse_args(["--seed", "3"]), **vars(trainer(flags)))
    run.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(run.optimizer)
    return run


def test_checkpoint_from_before_the_recipe_flags_still_resumes(tmp_path: Path) -> None:
    """A checkpoint without the settings of LEGACY_CONFIG in its args, nor a data fingerprint, was
    made with their legacy values (no weight decay, no clipping, SGD centers): it fits resnet's
    defaults only. A setting it does not record and LEGACY_CONFIG does not know is refused."""
    run, path = saved_run(), tmp_path / "checkpoint.pt"
    old = checkpoint(run, 1, None)
    del old["data"]
    for key in LEGACY_CONFIG:
        del old["args"][key]
    torch.save(old, path)
    assert load_checkpoint(path, run)["epoch"] == 1
    run.args = parse_args(["--seed", "3", "--width", "2"])
    with pytest.raises(CheckpointError, match=r"\(--width 1, this run --width 2\); resume with --"):
        load_checkpoint(path, run)
    del old["args"]["channels_last"]
    torch.save(old, path)
    run.args = parse_args(["--seed", "3"])
    with pytest.raises(CheckpointError, match=r"\(no record of it, this run --channels-last\); st"):
        load_checkpoint(path, run)


def test_a_checkpoint_is_restored_from_the_cpu_whatever_the_run_device(tmp_path: Path) -> None:
    """Resuming on CUDA failed: the checkpoint was loaded to the run's device, moving the saved
    random states there, and numpy, torch.set_rng_state and Generator.set_state take CPU tensors
    only. Here the run's device is `meta` (the same situation, no GPU needed): the weights, the
    random states and, mid-epoch, the accumulators (on the run's device) and the augmentation
    state (a CPU tensor) must still be restored."""
    saved = saved_run()
    state = EpochState.new(10, 2, torch.device("cpu"), torch.Generator().manual_seed(5))
    state.step, state.loss_sums[0] = 3, 1.5
    torch.manual_seed(11)
    torch.save(checkpoint(saved, 1, state), tmp_path / "checkpoint.pt")
    expected = torch.rand(3)
    run = saved_run(("--seed", "4"), device=torch.device("meta"))
    restored = load_checkpoint(tmp_path / "checkpoint.pt", run)["epoch_state"]
    assert torch.equal(torch.rand(3), expected)  # the random states were restored
    torch.testing.assert_close(run.model.state_dict(), saved.model.state_dict(), rtol=0, atol=0)
    assert restored.step == 3 and restored.loss_sums.device.type == "meta"
    assert restored.class_sum.device.type == "meta"
    assert restored.aug.device.type == "cpu" and torch.equal(restored.aug, state.aug)


def infinite_lr_at_epoch_2_step_3(monkeypatch) -> None:
    """One step with an infinite rate: its loss and gradients are finite, its weights are not."""
    step, calls = epoch.train_step, []

    def once(run, x, y):
        calls.append(None)
        group = run.optimizer.param_groups[0]
        lr, group["lr"] = group["lr"], float("inf") if len(calls) == STEPS + 3 else group["lr"]
        outputs = step(run, x, y)
        group["lr"] = lr
        return outputs

    monkeypatch.setattr(epoch, "train_step", once)


def nan_loss(monkeypatch) -> None:
    forward = Objective.forward

    def nan(self: Objective, *inputs: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss, terms = forward(self, *inputs)
        return loss * float("nan"), terms

    monkeypatch.setattr(Objective, "forward", nan)


def fp16_overflow(monkeypatch) -> None:
    """A loss scale of 3e38: every fp16 gradient is non-finite while the loss is finite."""
    scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, init_scale: scaler(device, 3e38))


EVERY_STEP = "every one of the 2 steps of epoch 1 was non-finite and taken back, so the epoch "
EVERY_STEP += "learned nothing; no checkpoint was saved"
TWO_STEPS = "--loss cent --epochs 1 --train-samples 4 --batch-size 2"  # fp16 steps are slow here
BAD_STEPS = r"(\d+) non-finite steps, the last at epoch 1 step 6 \(loss=\S+, xent=\S+, intra=\S+, "
BAD_STEPS += r"inter=\S+\); no bad update was applied and no checkpoint was saved"
BAD_WEIGHT = r"a weight is no longer finite at epoch 2 step 6, after a step whose loss and "
BAD_WEIGHT += r"gradients were finite \(too large an update\); the last good checkpoint is kept in"
DIVERGENCES = {  # cause: (flags, the error line after "error: training diverged: ", files left)
    "lr 1e30": ("--lr 1e30 --max-bad-steps 2", BAD_STEPS, ""),
    "nan loss": (TWO_STEPS, EVERY_STEP, ""),
    "fp16 gradients": (f"{TWO_STEPS} --amp fp16", EVERY_STEP, ""),
    "inf lr once": ("--max-bad-steps 100", BAD_WEIGHT, "checkpoint.pt metrics.csv"),
}
CAUSES = {"nan loss": nan_loss, "fp16 gradients": fp16_overflow}
CAUSES["inf lr once"] = infinite_lr_at_epoch_2_step_3


@pytest.mark.parametrize("cause", DIVERGENCES)
def test_divergence_ends_the_run_with_one_line_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, capsys, monkeypatch, cause: str
) -> None:
    """--max-bad-steps non-finite steps (all counted, though the count is read every LOG_EVERY steps
    and at the epoch's end), an epoch whose every step was taken back (a NaN loss, or fp16
    gradients that all overflow: its train loss would read 0), or a finite step that makes a weight
    non-finite: exit 1, one line with the loss terms, no summary, the checkpoint of the last whole
    epoch kept with finite weights (the interrupted epoch's is never written)."""
    flags, line, files = DIVERGENCES[cause]
    if cause in CAUSES:
        CAUSES[cause](monkeypatch)
    assert main([*TINY, *flags.split(), "--out", str(tmp_path), "--name", "run"]) == 1
    error = stderr_error_line(capsys.readouterr().err)
    match = re.match("error: training diverged: " + line, error)
    assert match, error
    # all counted: every step after the first, whose finite update broke the weights
    assert not match.groups() or int(match[1]) == STEPS - 1
    assert sorted(contents(tmp_path / "run")) == sorted(["args.json", *files.split()])
    if files:
        ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
        assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_divergence_message_gives_the_last_bad_steps_loss_terms(tmp_path: Path) -> None:
    run = SimpleNamespace(args=SimpleNamespace(max_bad_steps=2), bad_steps=1, dir=tmp_path)
    run.model, run.objective = torch.nn.Linear(1, 1), torch.nn.Module()
    last = torch.tensor([7.0, float("inf"), float("nan"), 1.0, float("-inf")], dtype=torch.float64)
    with pytest.raises(TrainingError) as info:
        check_divergence(run, 3, SimpleNamespace(bad_steps=torch.tensor(1), last_bad=last))
    assert str(info.value).startswith(
        "training diverged: 2 non-finite steps, the last at epoch 3 step 7 "
        "(loss=inf, xent=nan, intra=1, inter=-inf); "
    )


@pytest.mark.parametrize("test_loss", [float("nan"), float("inf")])
def test_a_final_test_loss_that_is_not_finite_does_not_end_done(
    tmp_path: Path, test_loss: float
) -> None:
    history = [{"epoch": 1, "test_loss": test_loss, "test_acc": 0.1}]
    run = SimpleNamespace(args=parse_args(["--no-plots"]), dir=tmp_path, history=history)
    with pytest.raises(TrainingError, match=f"final test loss is {test_loss}: the model diverged"):
        finish(run, None)
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.skipif(
    not Path("/proc/self/maps").is_file(), reason="needs Linux's /proc to see libraries loading"
)
@pytest.mark.parametrize("phase", ["torch import", "scikit-learn import", "run folder locked"])
def test_ctrl_c_at_each_phase_of_start_up_is_one_line(tmp_path: Path, phase: str) -> None:
    """SIGINT as torch's libraries are mapped (its import), as scikit-learn's are (the digits' lazy
    import, after main.py's imports), and once the run folder is locked: exit 130 and one line, no
    traceback, no summary. An exception raised into a lazy import can end in a traceback or a C++
    terminate (rc 134): until the loop's handlers, SIGINT ends the process at once."""
    out = tmp_path / "out"
    proc = start([*TINY, "--out", str(out), "--name", "run"])
    maps = Path(f"/proc/{proc.pid}/maps")
    reached = {
        "torch import": lambda: "libtorch" in maps.read_text(),
        "scikit-learn import": lambda: "/sklearn/" in maps.read_text(),
        "run folder locked": (out / "run" / ".lock").exists,
    }[phase]
    deadline = time.monotonic() + 120
    while proc.poll() is None and not reached() and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    line, loop = stderr.strip(), r"interrupted at epoch 1 step \d+; checkpoint saved, run the same"
    locked = phase == "run folder locked" and re.fullmatch(loop + " command to resume", line)
    assert line == STARTUP_INTERRUPT or locked, stderr
    assert not list(tmp_path.glob("**/summary.json"))
    if phase == "torch import":
        assert stdout == "" and not out.exists()


def test_ctrl_c_while_loading_data_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(main_module, "load_dataset", Mock(side_effect=KeyboardInterrupt))
    assert main([*TINY, "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == STARTUP_INTERRUPT
    assert not list(tmp_path.iterdir())


def trainer(flags: tuple[str, ...] = ()) -> Trainer:
    """main.py's trainer (default resnet, standalone, 2-D features) for 28x28 grey images."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 1, 28, 28), generator=g, dtype=torch.uint8)
    data = SimpleNamespace(channels=1, classes=list(range(10)), image_size=28)
    data.train = SimpleNamespace(images=images)
    return build_trainer(parse_args(["--seed", "3", *flags]), data, torch.device("cpu"))


def step_tensors(t: Trainer) -> list[torch.Tensor]:
    """Every tensor a step can change: weights, buffers (BatchNorm), centers, optimizer state."""
    tensors = [v for m in (t.model, t.objective) for v in m.state_dict(keep_vars=True).values()]
    states = t.optimizer.state.values()
    return tensors + [v for s in states for v in s.values() if torch.is_tensor(v)]


def batch(seed: int = 0, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.arange(n) % 10


RECIPES = {
    "resnet": (),
    "resnet-paper": ("--center-update", "paper"),
    "lenet-paper": ("--model", "lenet++", "--center-update", "paper"),  # clipping, weight decay
}


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("bad_at", [0, 2])
def test_a_non_finite_step_is_taken_back_exactly(bad_at: int, recipe: str) -> None:
    """Two trainers take the same four good steps; before step `bad_at` (0: the first, whose new
    momentum buffers must stay zero) the guarded one also takes a step on a NaN image, which must
    report a non-finite step and leave every tensor as it was, with each recipe (the paper's center
    update, lenet++'s clipping and weight decay). Afterwards every tensor of the two is equal, and
    the good steps moved the centers."""
    clean, guarded = trainer(RECIPES[recipe]), trainer(RECIPES[recipe])
    initial_centers = guarded.objective.centers.detach().clone()
    for i in range(4):
        x, labels = batch(i)
        if i == bad_at:
            before = [t.clone() for t in step_tensors(guarded)]
            poisoned = x.clone()
            poisoned[0, 0, 0, 0] = float("nan")
            assert not train_step(guarded, poisoned, labels)[-1]
            after = step_tensors(guarded)
            assert all(torch.equal(a, b) for a, b in zip(before, after))
            assert all(not t.any() for t in after[len(before) :])
        assert train_step(guarded, x, labels)[-1]
        train_step(clean, x, labels)
    pairs = list(zip(step_tensors(clean), step_tensors(guarded), strict=True))
    assert len(pairs) > 40 and all(torch.equal(a, b) for a, b in pairs)
    assert not torch.equal(guarded.objective.centers, initial_centers)


def test_a_paper_step_moves_the_centers_by_eq_4_with_no_host_sync(monkeypatch) -> None:
    """With --center-update paper the centers get no gradient and no SGD step: after a step they
    are exactly losses.paper_center_update of the step's features, with --center-alpha. Gradient
    clipping (lenet++'s recipe) and that update keep the step free of host syncs: no tensor is read
    as a Python number (.item(), bool(), float(), int(), .tolist()) inside train_step."""
    run = trainer(("--model", "lenet++", "--center-update", "paper", "--center-alpha", "0.25"))
    centers, groups = run.objective.centers, run.optimizer.param_groups
    assert run.clip_grad_norm == 10.0 and groups[0]["weight_decay"] == 5e-4
    assert not centers.requires_grad and all(p is not centers for g in groups for p in g["params"])
    before = centers.detach().clone()
    x, y = batch()
    x[0, 0, 0, 0] = 1e6  # a huge gradient: the clipping scales it
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        fail = lambda *a, name=name: pytest.fail(f"host sync: Tensor.{name}")  # noqa: E731
        monkeypatch.setattr(torch.Tensor, name, fail)
    features, *_, finite = train_step(run, x, y)
    monkeypatch.undo()
    assert finite and centers.grad is None
    paper_center_update(before, features.detach(), y, 0.25)
    assert torch.equal(centers, before)
    norms = [p.grad.norm() for g in groups for p in g["params"] if p.grad is not None]
    assert torch.stack(norms).norm().item() == pytest.approx(10.0, rel=1e-4)  # --clip-grad-norm


@pytest.mark.parametrize("init_scale", [1.0, 3e38])
def test_paper_centers_stay_when_the_fp16_scaler_skips_the_step(init_scale: float) -> None:
    """Under --amp fp16 a GradScaler whose scale overflows the gradients skips the optimizer step:
    the paper's centers must not move either, and the step is not applied (a run must not count as
    good the steps it skipped), though not bad: the scale backs off (its search does not count
    towards --max-bad-steps). With a scale that does not overflow, the step moves both."""
    t = trainer(("--amp", "fp16", "--center-update", "paper"))
    t.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    params = [p for group in t.optimizer.param_groups for p in group["params"]]
    weights = [p.detach().clone() for p in params]
    centers = t.objective.centers.detach().clone()
    *_, bad, finite = train_step(t, *batch(n=4))  # 4 images: fp16 is slow on the CPU
    skipped = init_scale > 1
    assert not bad and bool(finite) != skipped and (t.scaler.get_scale() < init_scale) == skipped
    assert torch.equal(t.objective.centers, centers) == skipped
    assert all(torch.equal(p, w) for p, w in zip(params, weights)) == skipped


def test_resume_on_other_data_is_refused(tmp_path: Path, capsys) -> None:
    """The checkpoint keeps a fingerprint of what was read: a folder run resumed with --data-dir at
    another tree of the same classes and size is refused (one line, exit 1, the run folder byte for
    byte as it was); the same images at another path resume (--data-dir may change)."""
    trees = [write_image_tree(tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 1))]
    shutil.copytree(trees[0], tmp_path / "a-copy")
    args = "--dataset folder --batch-size 4 --no-plots --model lenet++ --name run --out".split()
    args.append(str(tmp_path / "runs"))
    assert main([*args, "--data-dir", str(trees[0]), "--epochs", "1"]) == 0
    (tmp_path / "runs" / "run" / "summary.json").unlink()
    before, saved = contents(tmp_path / "runs"), torch.load(tmp_path / "runs/run/checkpoint.pt")
    capsys.readouterr()
    assert main([*args, "--data-dir", str(trees[1]), "--epochs", "2"]) == 1
    line = stderr_error_line(capsys.readouterr().err)
    other = f"({saved['data']}; --data-dir {trees[1]} holds 12 train and 6 test images of 1x28x28"
    assert f"checkpoint.pt: the checkpoint was trained on other data {other}, sha256 " in line
    assert contents(tmp_path / "runs") == before
    assert main([*args, "--data-dir", str(tmp_path / "a-copy"), "--epochs", "2"]) == 0


def test_inter_margin_bounds_the_push(tmp_path: Path) -> None:
    """With a margin each pair's inter term is at least -log(1 + margin), so -inter <= (m - 1)
    log(1 + margin) per sample. A margin of 0.01 is far below the features' squared distances, so
    the bound binds: without the margin the same run's train_inter is about -24."""
    args = [*TINY, "--epochs", "1", "--out", str(tmp_path), "--inter-margin", "0.01"]
    assert main(args) == 0
    inter = float(metrics_without_seconds(tmp_path / "standalone-digits-feat=2")[0]["train_inter"])
    bound = 31 * torch.log1p(torch.tensor(0.01)).item()  # ordered different-class pairs / m, m = 32
    assert 0.5 * bound <= -inter <= bound + 1e-4
