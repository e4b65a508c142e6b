"""Interruption, exact resume, corrupt checkpoints and the divergence guard (real signals to subprocesses; the rest in-process)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import listing, stderr_error_line, subprocess_env, write_image_tree

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
TINY = [
    "--dataset",
    "digits",
    "--train-samples",
    "384",
    "--batch-size",
    "32",
    "--epochs",
    "3",
    "--no-plots",
    "--model",
    "lenet++",
]


def start(args: list[str]) -> subprocess.Popen:
    """main.py in a process of its own, on one thread as the in-process runs (so that their results are bit for bit equal)."""
    env = subprocess_env()
    return subprocess.Popen(
        [sys.executable, "main.py", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def run(args: list[str]) -> subprocess.CompletedProcess:
    """main.py's main() in this process (no seconds of start-up), its exit code and output as a finished process's."""
    # main() reconfigures sys.stdout's errors
    out, err = (io.TextIOWrapper(io.BytesIO(), encoding="utf-8") for _ in range(2))
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as exc:  # argparse's refusals
            code = exc.code
    out.flush(), err.flush()
    return subprocess.CompletedProcess(
        ["main.py", *args], code, out.buffer.getvalue().decode(), err.buffer.getvalue().decode()
    )


def metrics_without_seconds(run_dir: Path) -> list[list[str]]:
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    keep = [i for i, name in enumerate(header) if name != "seconds"]
    return [[row.split(",")[i] for i in keep] for row in lines]


def assert_same_run(a: Path, b: Path) -> None:
    assert metrics_without_seconds(a) == metrics_without_seconds(b)
    ca = torch.load(a / "checkpoint.pt", weights_only=True)
    cb = torch.load(b / "checkpoint.pt", weights_only=True)
    for part in ("model", "objective"):
        assert ca[part].keys() == cb[part].keys()
        for key in ca[part]:
            assert torch.equal(ca[part][key], cb[part][key]), f"{part}.{key} differs after resume"
    assert ca["optimizer"]["param_groups"][0]["lr"] == cb["optimizer"]["param_groups"][0]["lr"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    result = run([*TINY, "--out", str(out), "--name", "full"])
    assert result.returncode == 0, result.stderr
    return out / "full"


def interrupt_after_first_epoch(args: list[str], sig: int, delay: float) -> subprocess.Popen:
    """Start a run, wait for its first epoch line, then send `sig` after `delay` seconds."""
    proc = start(args)
    for line in proc.stdout:
        if line.startswith("epoch 1/"):
            break
    time.sleep(delay)
    proc.send_signal(sig)
    proc.communicate(timeout=600)
    return proc


@pytest.mark.parametrize("delay", [0.0, 0.3])
def test_sigterm_then_resume_matches_uninterrupted(
    tmp_path: Path, reference: Path, delay: float
) -> None:
    args = [*TINY, "--out", str(tmp_path), "--name", "cut"]
    proc = interrupt_after_first_epoch(args, signal.SIGTERM, delay)
    run_dir = tmp_path / "cut"
    if proc.returncode == 143:
        assert not (run_dir / "summary.json").exists(), "an interrupted run must not look finished"
        assert (run_dir / "checkpoint.pt").is_file()
    else:
        assert proc.returncode == 0  # the signal came after the last step: nothing to resume
    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout or proc.returncode == 0
    assert (run_dir / "summary.json").is_file()
    assert_same_run(reference, run_dir)


HANGUP = (
    [(signal.SIGHUP, 129)] if hasattr(signal, "SIGHUP") else []
)  # a closed terminal; not Windows


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), *HANGUP])
def test_a_signal_mid_epoch_saves_and_resumes(tmp_path: Path, reference: Path, sig, code) -> None:
    args = [*TINY, "--out", str(tmp_path), "--name", "cut"]
    proc = interrupt_after_first_epoch(args, sig, 0.1)
    assert proc.returncode == code
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] >= 1
    assert run(args).returncode == 0
    assert_same_run(reference, tmp_path / "cut")


def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint(
    tmp_path: Path, reference: Path
) -> None:
    """SIGKILL cannot be caught: the atomic write (temp file, fsync, rename) must keep the previous checkpoint whole."""
    args = [*TINY, "--out", str(tmp_path), "--name", "cut"]
    for delay in (0.0, 0.05, 0.2):
        proc = interrupt_after_first_epoch(args, signal.SIGKILL, delay)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL
        torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
        assert not (tmp_path / "cut" / "summary.json").exists()
    result = run(args)
    assert result.returncode in (0, 2), result.stderr  # 2: it had finished before the last kill
    assert_same_run(reference, tmp_path / "cut")


def test_finished_run_is_refused_without_overwrite(reference: Path) -> None:
    args = [*TINY, "--out", str(reference.parent), "--name", "full"]
    before = (reference / "checkpoint.pt").read_bytes()
    result = run(args)
    assert result.returncode == 2
    assert "finished run" in result.stderr and "--overwrite" in result.stderr
    assert (reference / "checkpoint.pt").read_bytes() == before


def unfinished_copy(reference: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "unfinished"
    run_dir.mkdir()
    for name in ("checkpoint.pt", "metrics.csv", "args.json"):
        (run_dir / name).write_bytes((reference / name).read_bytes())
    return run_dir


def test_corrupt_checkpoint_is_refused_and_kept(tmp_path: Path, reference: Path) -> None:
    run_dir = unfinished_copy(reference, tmp_path)
    data = (run_dir / "checkpoint.pt").read_bytes()
    corrupt = data[: len(data) // 2]
    (run_dir / "checkpoint.pt").write_bytes(corrupt)
    result = run([*TINY, "--out", str(tmp_path), "--name", "unfinished"])
    assert result.returncode == 1
    assert "corrupt" in result.stderr and "checkpoint.pt" in result.stderr
    assert "Traceback" not in result.stderr
    assert (run_dir / "checkpoint.pt").read_bytes() == corrupt
    assert not (run_dir / "summary.json").exists()


def drop(key: str):
    def damage(ckpt: dict) -> dict:
        del ckpt[key]
        return ckpt

    return damage


@pytest.mark.parametrize(
    "damage,message",
    [
        (drop("scheduler"), "missing or malformed: scheduler"),
        (drop("random"), "missing or malformed: random"),
        (drop("epoch_state"), "missing or malformed: epoch_state"),
        (
            lambda c: {**c, "epoch_state": {"step": 3}},
            "missing or malformed: epoch_state.loss_sums",
        ),
        (lambda c: {**c, "args": ["loss"]}, "missing or malformed: args"),
        (lambda c: {**c, "epoch": 2.5}, "missing or malformed: epoch"),
        (lambda c: list(c), "missing or malformed: all of it"),
        (lambda c: {**c, "optimizer": {"state": {}}}, "checkpoint does not fit this run (KeyError"),
        (lambda c: {**c, "random": {"torch": None}}, "checkpoint does not fit this run (TypeError"),
    ],
)
def test_damaged_checkpoint_is_one_line_and_kept(
    tmp_path: Path, reference: Path, capsys, damage, message: str
) -> None:
    """A checkpoint missing a part, or holding one of the wrong shape, is refused with one line and
    exit 1 before anything changes (README: corrupt checkpoints end in one line)."""
    run_dir = unfinished_copy(reference, tmp_path)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert set(ckpt) == {*CHECKPOINT_KEYS, "data"}  # data: the fingerprint, which older ones lack
    torch.save(damage(ckpt), run_dir / "checkpoint.pt")
    before = listing(tmp_path)
    assert main([*TINY, "--out", str(tmp_path), "--name", "unfinished"]) == 1
    line = stderr_error_line(capsys.readouterr().err)
    assert message in line and str(run_dir / "checkpoint.pt") in line
    assert listing(tmp_path) == before


def contents(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes, but the lock files (which any command that reaches the folder takes)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in (".lock", ".lock.pid")
    }


@pytest.mark.parametrize(
    "change,message",
    [
        (["--lr", "0.02"], "(--lr 0.01, this run --lr 0.02); resume with --lr 0.01, or"),
        (["--lr-cent", "0.5"], "(--lr-cent 0.01, this run --lr-cent 0.5)"),
        (["--momentum", "0.5"], "(--momentum 0.9, this run --momentum 0.5)"),
        (["--patience", "5"], "(--patience 3, this run --patience 5)"),
        (["--amp", "bf16"], "(--amp off, this run --amp bf16)"),  # half fp32, half bf16
        (["--no-channels-last"], "(--channels-last, this run --no-channels-last)"),
        (["--compile"], "(no --compile, this run --compile default)"),
        (["--model", "resnet"], "(--model lenet++, this run --model resnet)"),
        (["--loss", "cent"], "(--loss standalone, this run --loss cent)"),
        (["--seed", "1"], "(--seed 0, this run --seed 1)"),
        (["--val-fraction", "0.1"], "(--val-fraction 0.0, this run --val-fraction 0.1)"),
        (["--weight-decay", "0"], "(--weight-decay 0.0005, this run --weight-decay 0.0)"),
        (["--inter-margin", "1"], "(no --inter-margin, this run --inter-margin 1.0)"),
        (["--pipeline", "loader"], "(--pipeline fast, this run --pipeline loader)"),
        (["--epochs", "2"], "--epochs 2: the checkpoint"),
    ],
)
def test_resume_with_any_other_setting_is_refused(
    tmp_path: Path, reference: Path, capsys, change, message
) -> None:
    """One rule: every setting but the few that cannot change the numbers (checkpoints.FREE_KEYS) must be the
    checkpoint's, a flag added later included (another --channels-last left the momentum buffers in the saved
    layout). One line, exit 1 (2 for fewer --epochs than trained), and the run folder byte for byte as it was."""
    unfinished_copy(reference, tmp_path)
    before = contents(tmp_path)
    try:
        code = main([*TINY, "--out", str(tmp_path), "--name", "unfinished", *change])
    except SystemExit as exc:
        code = exc.code
    line = stderr_error_line(capsys.readouterr().err)
    assert code == (2 if change[0] == "--epochs" else 1)
    assert message in line and str(tmp_path / "unfinished" / "checkpoint.pt") in line
    assert contents(tmp_path) == before


def test_resume_with_more_epochs_extends_the_run(tmp_path: Path, reference: Path) -> None:
    """More --epochs extend the run, and the flags that cannot change its numbers may change too."""
    run_dir = unfinished_copy(reference, tmp_path)
    free = [
        "--device",
        "cpu",
        "--eval-every",
        "2",
        "--max-bad-steps",
        "9",
        "--tensorboard",
        "--threads",
        "1",
    ]
    assert (
        main([*TINY, "--out", str(tmp_path), "--name", "unfinished", "--epochs", "4", *free]) == 0
    )
    rows = metrics_without_seconds(run_dir)
    assert len(rows) == 1 + 4 and rows[:4] == metrics_without_seconds(reference)
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 4


def test_paper_center_update_resumes_exactly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--center-update paper: the centers travel in the checkpoint (outside the optimizer), and a run
    cut after epoch 1 and resumed ends bit for bit like the straight run (in-process: no start-up)."""
    args = [*TINY, "--train-samples", "128", "--center-update", "paper", "--out", str(tmp_path)]
    assert main([*args, "--epochs", "2", "--name", "straight"]) == 0
    assert main([*args, "--epochs", "1", "--name", "cut"]) == 0
    after_one = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert len(after_one["optimizer"]["param_groups"]) == 1  # the model's only
    (tmp_path / "cut" / "summary.json").unlink()
    capsys.readouterr()
    assert main([*args, "--epochs", "2", "--name", "cut"]) == 0
    assert "resuming" in capsys.readouterr().out
    # Epoch 1 differs only in the retrieval metrics, computed after the last epoch of the 1-epoch run.
    assert (
        metrics_without_seconds(tmp_path / "straight")[-1]
        == metrics_without_seconds(tmp_path / "cut")[-1]
    )
    straight, resumed = (
        torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
        for name in ("straight", "cut")
    )
    for part in ("model", "objective"):
        assert all(torch.equal(straight[part][k], resumed[part][k]) for k in straight[part]), part
    momentum = [
        s["momentum_buffer"] for c in (straight, resumed) for s in c["optimizer"]["state"].values()
    ]
    assert len(momentum) > 20 and all(
        torch.equal(a, b)
        for a, b in zip(momentum[: len(momentum) // 2], momentum[len(momentum) // 2 :])
    )
    centers = resumed["objective"]["criterion.centers"]
    # epoch 2 moved them
    assert not torch.equal(centers, after_one["objective"]["criterion.centers"])


IMAGES = ImageData(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.arange(4))
STATE = {  # what checkpoint() and load_checkpoint() read of a run besides its trainer and args
    "device": torch.device("cpu"),
    "history": [],
    "train_seconds": 0.0,
    "samples": 0,
    "bad_steps": 0,
    "train": IMAGES,
    "test": IMAGES,
}


def test_checkpoint_from_before_the_recipe_flags_still_resumes(tmp_path: Path) -> None:
    """A checkpoint without the settings of LEGACY_CONFIG in its args, nor a data fingerprint, was made with
    their legacy values (no weight decay, no clipping, SGD centers): it fits resnet's defaults only. A setting
    that it does not record and LEGACY_CONFIG does not know (a flag added later) is refused."""
    run = SimpleNamespace(**STATE, args=parse_args(["--seed", "3"]), **vars(trainer()))
    run.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(run.optimizer)
    old = checkpoint(run, 1, None)
    del old["data"]
    for key in LEGACY_CONFIG:
        del old["args"][key]
    torch.save(old, tmp_path / "checkpoint.pt")
    assert load_checkpoint(tmp_path / "checkpoint.pt", run)["epoch"] == 1
    run.args = parse_args(["--seed", "3", "--width", "2"])
    with pytest.raises(
        CheckpointError,
        match=r"configuration \(--width 1, this run --width 2\); resume with --width 1,",
    ):
        load_checkpoint(tmp_path / "checkpoint.pt", run)
    del old["args"]["channels_last"]
    torch.save(old, tmp_path / "checkpoint.pt")
    run.args = parse_args(["--seed", "3"])
    with pytest.raises(
        CheckpointError, match=r"\(no record of it, this run --channels-last\); start again"
    ):
        load_checkpoint(tmp_path / "checkpoint.pt", run)


def test_a_checkpoint_is_restored_from_the_cpu_whatever_the_run_device(tmp_path: Path) -> None:
    """Resuming on CUDA failed every time: the checkpoint was loaded to the run's device, which moved the
    saved random states there, and numpy, torch.set_rng_state and Generator.set_state take CPU tensors
    only. The run's device here is `meta` (no GPU needed, the same situation): the checkpoint must still
    restore the weights, the random states and, mid-epoch, the accumulators (on the run's device) with
    the augmentation state (a CPU tensor)."""
    state = STATE
    saved = SimpleNamespace(**state, args=parse_args(["--seed", "3"]), **vars(trainer()))
    saved.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(saved.optimizer)
    epoch = EpochState.new(10, 2, torch.device("cpu"), torch.Generator().manual_seed(5))
    epoch.step, epoch.loss_sums[0] = 3, 1.5
    torch.manual_seed(11)
    torch.save(checkpoint(saved, 1, epoch), tmp_path / "checkpoint.pt")
    expected = torch.rand(3)
    run = SimpleNamespace(
        **state | {"device": torch.device("meta")},
        args=parse_args(["--seed", "3"]),
        **vars(trainer(("--seed", "4"))),
    )
    run.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(run.optimizer)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt", run)
    assert torch.equal(torch.rand(3), expected)  # the random states were restored
    assert all(
        torch.equal(a, b)
        for a, b in zip(run.model.state_dict().values(), saved.model.state_dict().values())
    )
    restored = ckpt["epoch_state"]
    assert (
        restored.step == 3
        and restored.loss_sums.device.type == "meta"
        and restored.class_sum.device.type == "meta"
    )
    assert restored.aug.device.type == "cpu" and torch.equal(restored.aug, epoch.aug)


def test_resume_flag_without_checkpoint_is_an_error(tmp_path: Path) -> None:
    result = run([*TINY, "--out", str(tmp_path), "--resume"])
    assert result.returncode == 2
    assert "no checkpoint" in result.stderr


def test_divergence_guard_stops_with_the_loss_terms(tmp_path: Path) -> None:
    result = run(
        [*TINY, "--out", str(tmp_path), "--name", "boom", "--lr", "1e30", "--max-bad-steps", "2"]
    )
    assert result.returncode == 1, result.stdout + result.stderr
    message = result.stderr.strip().splitlines()[-1]
    # The count is read every LOG_EVERY steps and at the epoch's end (12 steps here): all bad steps are counted.
    match = re.match(
        r"error: training diverged: (\d+) non-finite steps, the last at epoch 1 step (\d+) ",
        message,
    )
    assert match and 2 <= int(match[1]) <= int(match[2]) == 12, message
    assert "step" in message and "loss=" in message and "intra=" in message and "inter=" in message
    # it diverged in the first epoch
    assert "no checkpoint was saved" in message and "last good checkpoint" not in message
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in (tmp_path / "boom").iterdir()) == [
        ".lock",
        ".lock.pid",
        "args.json",
    ]


@pytest.mark.parametrize("cause", ["nan loss", "fp16 gradients"])
def test_an_epoch_whose_every_step_was_taken_back_is_divergence(
    tmp_path: Path, capsys, monkeypatch, cause: str
) -> None:
    """Every loss NaN, or under fp16 every gradient non-finite with a finite loss (a loss scale of 3e38): each
    of the 2 steps is taken back, fewer than --max-bad-steps 5; the epoch learned nothing and its train loss
    would read 0 (fp16 ended "done"). Exit 1, one line, no summary."""
    forward, scaler = Objective.forward, torch.amp.GradScaler

    def nan_loss(self: Objective, *inputs: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss, terms = forward(self, *inputs)
        return loss * float("nan"), terms

    if cause == "nan loss":
        monkeypatch.setattr(Objective, "forward", nan_loss)
    else:
        monkeypatch.setattr(
            torch.amp, "GradScaler", lambda device, init_scale: scaler(device, 3e38)
        )
    args = [
        *TINY,
        *(["--amp", "fp16"] if cause == "fp16 gradients" else []),
        "--loss",
        "cent",
        "--epochs",
        "1",
        "--train-samples",
        "64",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 1
    line = stderr_error_line(capsys.readouterr().err)
    assert line.startswith(
        "error: training diverged: every one of the 2 steps of epoch 1 was non-finite and taken back"
    )
    assert "no checkpoint was saved" in line
    assert not list(tmp_path.glob("**/summary.json")) and not list(tmp_path.glob("**/metrics.csv"))


def test_inter_margin_bounds_the_push(tmp_path: Path) -> None:
    """With a margin each pair's inter term is at least -log(1 + margin), so -inter <= (m - 1) log(1 + margin)
    per sample. A margin of 0.01 is far below the features' squared distances, so the bound binds: without
    the margin the same run's train_inter is about -24, far past the bound of 0.31."""
    margin = 0.01
    result = run([*TINY, "--epochs", "1", "--out", str(tmp_path), "--inter-margin", str(margin)])
    assert result.returncode == 0, result.stderr
    rows = (tmp_path / "standalone-digits-feat=2" / "metrics.csv").read_text().splitlines()
    header, values = rows[0].split(","), rows[1].split(",")
    inter = float(values[header.index("train_inter")])
    # (1/m) sum over ordered different-class pairs, m = 32
    bound = 31 * torch.log1p(torch.tensor(margin)).item()
    assert 0.5 * bound <= -inter <= bound + 1e-4


def trainer(flags: tuple[str, ...] = ()) -> Trainer:
    """main.py's trainer (default resnet, standalone loss, 2-D features) for 28x28 grey images, 10 classes."""
    images = torch.randint(
        0, 256, (32, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    data = SimpleNamespace(
        channels=1, classes=list(range(10)), image_size=28, train=SimpleNamespace(images=images)
    )
    return build_trainer(parse_args(["--seed", "3", *flags]), data, torch.device("cpu"))


def step_tensors(t: Trainer) -> list[torch.Tensor]:
    """Every tensor one training step can change: weights, buffers (BatchNorm statistics), centers, optimizer state."""
    tensors = [v for m in (t.model, t.objective) for v in m.state_dict(keep_vars=True).values()]
    return tensors + [
        v for s in t.optimizer.state.values() for v in s.values() if torch.is_tensor(v)
    ]


def assert_bad_step_is_taken_back(
    flags: tuple[str, ...], bad_at: int, bad_step
) -> tuple[Trainer, int]:
    """Two trainers take the same four good steps; before step `bad_at` the guarded one also takes
    `bad_step(trainer, x, labels)`, which must report a non-finite step and leave weights, centers,
    BatchNorm statistics and momentum as they were (a bad first step's new momentum buffers at zero).
    Afterwards every tensor of the two must be equal; returns the guarded trainer and the number of tensors compared."""
    batches = [
        torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(4)
    ]
    labels = torch.arange(16) % 10
    clean, guarded = trainer(flags), trainer(flags)
    tensors = step_tensors
    for i, x in enumerate(batches):
        if i == bad_at:
            before = [t.clone() for t in tensors(guarded)]
            assert not bad_step(guarded, x, labels)
            after = tensors(guarded)
            assert all(torch.equal(a, b) for a, b in zip(before, after)) and all(
                not t.any() for t in after[len(before) :]
            )
        *_, finite = train_step(guarded, x, labels)
        assert finite
        train_step(clean, x, labels)
    pairs = list(zip(tensors(clean), tensors(guarded), strict=True))
    assert all(torch.equal(a, b) for a, b in pairs)
    return guarded, len(pairs)


def nan_image_step(t: Trainer, x: torch.Tensor, labels: torch.Tensor) -> bool:
    poisoned = x.clone()
    poisoned[0, 0, 0, 0] = float("nan")
    return train_step(t, poisoned, labels)[-1]


@pytest.mark.parametrize("bad_at", [0, 2])
def test_a_non_finite_step_is_taken_back_exactly(bad_at: int) -> None:
    """A NaN image (non-finite loss) is taken back exactly, also as the first step."""
    _, compared = assert_bad_step_is_taken_back((), bad_at, nan_image_step)
    assert compared > 50


def test_a_finite_step_that_makes_a_weight_non_finite_is_divergence(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """An infinite learning rate for one step of epoch 2: its loss and gradients are finite, so it is
    applied and the weights become non-finite. The run ends with the divergence error (exit 1), no
    summary, and the checkpoint of epoch 1 with finite weights (the interrupted epoch's is never written)."""
    step = epoch.train_step
    calls = {"n": 0}

    def infinite_lr_once(run, x, y):
        calls["n"] += 1
        groups = run.optimizer.param_groups
        lr = groups[0]["lr"]
        groups[0]["lr"] = float("inf") if calls["n"] == 12 + 3 else lr
        outputs = step(run, x, y)
        groups[0]["lr"] = lr
        return outputs

    monkeypatch.setattr(epoch, "train_step", infinite_lr_once)
    assert (
        main(
            [
                *TINY,
                "--epochs",
                "2",
                "--max-bad-steps",
                "100",
                "--out",
                str(tmp_path),
                "--name",
                "huge",
            ]
        )
        == 1
    )
    line = stderr_error_line(capsys.readouterr().err)
    assert line.startswith(
        "error: training diverged: a weight is no longer finite at epoch 2 step "
    ), line
    assert "the last good checkpoint is kept in" in line
    ckpt = torch.load(tmp_path / "huge" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (tmp_path / "huge" / "summary.json").exists()


@pytest.mark.parametrize("has_checkpoint", [True, False])
def test_divergence_message_mentions_a_checkpoint_only_when_there_is_one(
    tmp_path: Path, has_checkpoint: bool
) -> None:
    if has_checkpoint:
        (tmp_path / "checkpoint.pt").write_bytes(b"an earlier epoch")
    run = SimpleNamespace(
        args=SimpleNamespace(max_bad_steps=2),
        bad_steps=1,
        dir=tmp_path,
        model=torch.nn.Linear(1, 1),
        objective=torch.nn.Module(),
    )
    state = SimpleNamespace(
        bad_steps=torch.tensor(1),
        last_bad=torch.tensor(
            [7.0, float("inf"), float("nan"), 1.0, float("-inf")], dtype=torch.float64
        ),
    )
    with pytest.raises(TrainingError) as info:
        check_divergence(run, 3, state)
    message = str(info.value)
    assert message.startswith(
        "training diverged: 2 non-finite steps, the last at epoch 3 step 7 (loss=inf, xent=nan, intra=1, inter=-inf)"
    )
    assert ("the last good checkpoint is kept in" in message) == has_checkpoint
    assert ("no checkpoint was saved" in message) == (not has_checkpoint)


@pytest.mark.parametrize("test_loss", [float("nan"), float("inf")])
def test_a_final_test_loss_that_is_not_finite_does_not_end_done(
    tmp_path: Path, test_loss: float
) -> None:
    run = SimpleNamespace(
        args=parse_args(["--no-plots"]),
        dir=tmp_path,
        history=[{"epoch": 1, "test_loss": test_loss, "test_acc": 0.1}],
    )
    with pytest.raises(
        TrainingError, match=f"the final test loss is {test_loss}: the model diverged"
    ):
        finish(run, None)
    assert not (tmp_path / "summary.json").exists()


LOOP_INTERRUPT = re.compile(
    r"interrupted at epoch 1 step \d+; checkpoint saved, run the same command to resume"
)


@pytest.mark.skipif(
    not Path("/proc/self/maps").is_file(), reason="needs Linux's /proc to see libraries loading"
)
@pytest.mark.parametrize("phase", ["torch import", "scikit-learn import", "run folder locked"])
def test_ctrl_c_at_each_phase_of_start_up_is_one_line(tmp_path: Path, phase: str) -> None:
    """SIGINT as torch's libraries are mapped (its import), as scikit-learn's are (the digits' lazy import,
    after main.py's imports), and once the run folder is locked (model, args.json, first batches): exit
    130 and one line each, no traceback, no summary. An exception raised into a lazy import can end in
    a traceback or a C++ terminate (rc 134): until the loop's handlers, SIGINT ends the process at once."""
    out = tmp_path / "out"
    proc = start([*TINY, "--out", str(out), "--name", "run"])
    maps, lock = Path(f"/proc/{proc.pid}/maps"), out / "run" / ".lock"
    reached = {
        "torch import": lambda: "libtorch" in maps.read_text(),
        "scikit-learn import": lambda: "/sklearn/" in maps.read_text(),
        "run folder locked": lock.exists,
    }[phase]
    deadline = time.monotonic() + 120
    while proc.poll() is None and not reached() and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    line = stderr.strip()
    assert line == STARTUP_INTERRUPT or (
        phase == "run folder locked" and LOOP_INTERRUPT.fullmatch(line)
    ), stderr
    assert not list(tmp_path.glob("**/summary.json"))
    if phase == "torch import":
        assert stdout == "" and not out.exists()


def test_ctrl_c_while_loading_data_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(main_module, "load_dataset", interrupted)
    assert main([*TINY, "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == STARTUP_INTERRUPT
    assert not list(tmp_path.iterdir())


def test_ctrl_c_in_the_final_summary_says_rerun_finishes(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """Ctrl-C while finish() draws and summarises (after the last checkpoint): exit 130, a line that
    says the checkpoint is saved, and the same command then finishes the run from it."""
    args = [
        *TINY,
        "--epochs",
        "1",
        "--train-samples",
        "64",
        "--out",
        str(tmp_path),
        "--name",
        "cut",
    ]
    summary = main_module.run_summary

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(main_module, "run_summary", interrupted)
    assert main(args) == 130
    err = capsys.readouterr().err.strip()
    assert (
        err
        == "interrupted while drawing the final pictures and writing summary.json; the checkpoint of epoch 1 is saved, run the same command to finish the run"
    )
    assert (tmp_path / "cut" / "checkpoint.pt").is_file() and not (
        tmp_path / "cut" / "summary.json"
    ).exists()
    monkeypatch.setattr(main_module, "run_summary", summary)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "done:" in out
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["epochs"] == 1


RECIPES = {
    "resnet": (),
    "resnet-paper": ("--center-update", "paper"),
    "lenet-paper": (
        "--model",
        "lenet++",
        "--center-update",
        "paper",
    ),  # clipping and weight decay too
}


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("bad_at", [0, 2])
def test_a_bad_step_is_taken_back_with_each_recipe(bad_at: int, recipe: str) -> None:
    """A NaN image's step is taken back exactly with the paper's center update and lenet++'s
    gradient clipping and weight decay too, and the good steps still move the centers."""
    initial_centers = trainer(RECIPES[recipe]).objective.centers.detach().clone()
    guarded, compared = assert_bad_step_is_taken_back(RECIPES[recipe], bad_at, nan_image_step)
    assert compared > 40 and not torch.equal(guarded.objective.centers, initial_centers)


def test_paper_centers_are_out_of_the_optimizer_and_move_by_eq_4() -> None:
    """With --center-update paper the centers get no gradient and no SGD step: after a step they are
    exactly losses.paper_center_update of the step's features, with --center-alpha."""
    run = trainer(("--center-update", "paper", "--center-alpha", "0.25"))
    centers = run.objective.centers
    assert not centers.requires_grad and all(
        p is not centers for g in run.optimizer.param_groups for p in g["params"]
    )
    before = centers.detach().clone()
    x, y = (
        torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)),
        torch.arange(16) % 10,
    )
    features, *_, finite = train_step(run, x, y)
    assert finite and centers.grad is None
    paper_center_update(before, features.detach(), y, 0.25)
    assert torch.equal(centers, before)


def test_the_step_has_no_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradient clipping and the paper's center update keep the step free of host syncs: no tensor
    is read as a Python number (.item(), bool(), float(), int(), .tolist()) inside train_step."""
    run = trainer(("--model", "lenet++", "--center-update", "paper"))
    assert run.clip_grad_norm == 10.0 and run.optimizer.param_groups[0]["weight_decay"] == 5e-4
    x, y = (
        torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)),
        torch.arange(16) % 10,
    )
    x[0, 0, 0, 0] = 1e6  # a huge gradient: the clipping scales it
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(
            torch.Tensor, name, lambda *a, name=name: pytest.fail(f"host sync: Tensor.{name}")
        )
    train_step(run, x, y)
    monkeypatch.undo()
    grads = [
        p.grad
        for group in run.optimizer.param_groups
        for p in group["params"]
        if p.grad is not None
    ]
    # clipped to --clip-grad-norm
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item() == pytest.approx(
        10.0, rel=1e-4
    )


@pytest.mark.parametrize("init_scale", [1.0, 3e38])
def test_paper_centers_stay_when_the_fp16_scaler_skips_the_step(init_scale: float) -> None:
    """Under --amp fp16 a GradScaler whose scale overflows the gradients skips the optimizer step;
    the paper's centers must not move either, and the step is not applied (a finite loss is not enough: a run
    must not count as good the steps it skipped), though not bad: the scale backs off (the scaler's search for
    a scale does not count towards --max-bad-steps). With a scale that does not overflow, the step moves both."""
    t = trainer(("--amp", "fp16", "--center-update", "paper"))
    t.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    params = [p for group in t.optimizer.param_groups for p in group["params"]]
    weights = [p.detach().clone() for p in params]
    centers = t.objective.centers.detach().clone()
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    *_, bad, finite = train_step(t, x, torch.arange(16) % 10)
    skipped = init_scale > 1
    assert not bad and bool(finite) != skipped and (t.scaler.get_scale() < init_scale) == skipped
    assert torch.equal(t.objective.centers, centers) == skipped
    assert all(torch.equal(p, w) for p, w in zip(params, weights)) == skipped


def test_resume_on_other_data_is_refused(tmp_path: Path, capsys) -> None:
    """The checkpoint keeps a fingerprint of what was read: a folder run resumed with --data-dir at another tree of
    the same classes and size is refused (one line, exit 1, the run folder byte for byte as it was); the same
    images at another path resume (--data-dir may change)."""
    trees = [write_image_tree(tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 1))]
    shutil.copytree(trees[0], tmp_path / "a-copy")
    args = ["--dataset", "folder", "--batch-size", "4", "--no-plots", "--model", "lenet++"]
    args += ["--out", str(tmp_path / "runs"), "--name", "run"]
    assert main([*args, "--data-dir", str(trees[0]), "--epochs", "1"]) == 0
    (tmp_path / "runs" / "run" / "summary.json").unlink()
    before, saved = contents(tmp_path / "runs"), torch.load(tmp_path / "runs/run/checkpoint.pt")
    capsys.readouterr()
    assert main([*args, "--data-dir", str(trees[1]), "--epochs", "2"]) == 1
    line = stderr_error_line(capsys.readouterr().err)
    assert (
        f"checkpoint.pt: the checkpoint was trained on other data ({saved['data']}; --data-dir {trees[1]} holds 12 train and 6 test images of 1x28x28, sha256 "
        in line
    )
    assert contents(tmp_path / "runs") == before
    assert main([*args, "--data-dir", str(tmp_path / "a-copy"), "--epochs", "2"]) == 0
