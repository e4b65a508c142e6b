"""The CUDA fast path never waits for the host: training steps of every loss, and one evaluation,
under torch.cuda.set_sync_debug_mode("error"), which raises on any synchronising call (.item(), a
blocking or pageable copy, nonzero, ...); --compile reduce-overhead (CUDA graphs) trains like the
eager step; a CUDA run cut mid-epoch resumes. The CUDA cases are skipped only where CUDA is absent;
the CPU cases run the same harness everywhere, so it is itself tested on every machine."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest
import torch
from conftest import metrics_without_seconds

import epoch
from batches import tensor_batches
from config import parse_args
from datasets import Dataset, ImageData
from epoch import record_step
from evaluation import acc_predictions, embed, eval_logits
from losses import LOSSES
from main import main
from training import EpochState, build_trainer, cuda_backends, train_step

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
BATCH, STEPS = 32, 4


def synthetic(device: torch.device, classes: int = 10, augment: bool = True) -> Dataset:
    """Random 28x28 grey images (MNIST's shape) in `classes` classes on `device`; without `augment`
    none of the random augmentations (whose generators draw differently on the CPU and CUDA)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (BATCH * (STEPS + 1), 1, 28, 28), generator=g, dtype=torch.uint8)
    train = ImageData(images, torch.arange(len(images)) % classes)
    test = ImageData(images[:100], torch.arange(100) % classes)
    augmentations = ("flip", "rotate", "crop") if augment else ()
    names = [str(k) for k in range(classes)]
    return Dataset("synthetic", train.to(device), test.to(device), names, augmentations, "test")


def run_steps(
    loss: str, device: str, amp: str, sync_mode: str, classes: int = 10, augment: bool = True
) -> tuple[EpochState, SimpleNamespace, int]:
    """One warm-up step (allocations, cuDNN autotuning), then STEPS steps and an evaluation under
    the sync debug mode; returns the epoch's accumulators, the run and the test images it gets
    right."""
    args = parse_args(f"--loss {loss} --device {device} --amp {amp} --batch-size {BATCH}".split())
    dev = torch.device(device)
    data = synthetic(dev, classes, augment)
    run = SimpleNamespace(**vars(build_trainer(args, data, dev)), args=args, device=dev)
    run.collect_frames, run.frame_take = True, BATCH
    # RowSGD: more classes than the batch
    rows = classes > BATCH and loss in ("cent", "standalone")
    assert (run.center_optimizer is not None) == rows
    aug = torch.Generator(dev).manual_seed(1)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(2)).to(dev)
    batches = tensor_batches(data.train, order, BATCH, data.augmentations, aug)
    state = EpochState.new(len(data.classes), args.feat_dim, dev, aug)
    record_step(run, state, *train_step(run, *next(batches)))
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(sync_mode)
    try:
        for x, y in batches:
            record_step(run, state, *train_step(run, x, y))
            state.aug = aug.get_state()
        features = embed(run, data.test)
        centers = run.objective.centers
        logits = eval_logits(run, features)
        detached = centers.detach() if centers is not None else None
        correct = (acc_predictions(loss, features, logits, detached) == data.test.labels).sum()
    finally:
        if dev.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    good = state.good_steps()  # fp16: the scaler's first overflows are skipped, and not bad
    assert state.step == STEPS + 1 and int(state.bad_steps) == 0
    assert good == STEPS + 1 or amp == "fp16"
    # The device's evaluation against the same rule on the CPU, from the same features.
    on_cpu = [t.detach().cpu() if t is not None else None for t in (features, logits, centers)]
    assert int(correct) == int((acc_predictions(loss, *on_cpu) == data.test.labels.cpu()).sum())
    assert torch.isfinite(state.loss_sums).all() and int(state.class_count.sum()) == good * BATCH
    assert sum(len(f) for f in state.frame_features) == (STEPS + 1) * BATCH
    return state, run, int(correct)


SYNC_ROWS = [("cpu", "cent", "off", 10), ("cpu", "cent", "off", 100)]  # the harness itself
SYNC_ROWS += [("cuda", loss, "off", 10) for loss in LOSSES]
# 100 classes at batch 32: RowSGD steps the batch's centers, every size fixed by the batch (a sparse
# gradient's coalesce() would ask the host its size); fp16 unscales its gradient on the device.
SYNC_ROWS += [
    ("cuda", loss, amp, 100) for loss in ("cent", "standalone") for amp in ("off", "fp16")
]
# fp16: the GradScaler's unscale_ and update run on the device, and so do the skipped overflows
SYNC_ROWS += [("cuda", "standalone", amp, 10) for amp in ("bf16", "fp16")]


@pytest.mark.parametrize(
    ("device", "loss", "amp", "classes"),
    [pytest.param(*row, marks=CUDA if row[0] == "cuda" else ()) for row in SYNC_ROWS],
)
def test_steps_and_evaluation_never_sync(device: str, loss: str, amp: str, classes: int) -> None:
    run_steps(loss, device, amp, "error", classes)


@CUDA
@pytest.mark.parametrize("loss", LOSSES)
def test_cuda_trains_like_the_cpu(loss):
    """The same seed, batches and weights, no augmentation, float32 without TF32 on both
    (cuda_backends, as main.py): after STEPS + 1 steps the summed losses, the per-class feature sums
    and every weight agree within rtol 1e-3, atol 1e-4 (float32 sums in other orders and cuDNN's
    algorithms, over 5 steps), and the test images counted right within 2 of 100."""
    cuda_backends(torch.device("cuda"))
    (cpu, cpu_run, cpu_correct), (gpu, gpu_run, gpu_correct) = (
        run_steps(loss, device, "off", "default", augment=False) for device in ("cpu", "cuda")
    )
    tolerance = {"rtol": 1e-3, "atol": 1e-4}
    torch.testing.assert_close(gpu.loss_sums.cpu(), cpu.loss_sums, **tolerance)
    torch.testing.assert_close(gpu.class_sum.cpu(), cpu.class_sum, **tolerance)
    for part in ("model", "objective"):
        ours, theirs = (getattr(r, part).state_dict() for r in (gpu_run, cpu_run))
        for key, value in theirs.items():
            torch.testing.assert_close(ours[key].cpu(), value, **tolerance, msg=f"{part}.{key}")
    assert abs(gpu_correct - cpu_correct) <= 2


@CUDA
def test_sync_debug_mode_catches_a_sync():
    """The check can fail: an .item() in the step is caught."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):
            torch.ones(1, device="cuda").sum().item()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def small_trainer(*flags: str):
    args = parse_args(["--dataset", "mnist", "--device", "cuda", "--batch-size", "16", *flags])
    return build_trainer(args, synthetic(torch.device("cuda")), torch.device("cuda"))


@CUDA
def test_reduce_overhead_trains_like_the_eager_step():
    """--compile reduce-overhead (torch.compile's CUDA graphs) against the eager step on the same
    batches: the same losses and weights up to cuDNN's and inductor's choices, and a NaN batch
    skipped by both."""
    eager, graphed = small_trainer(), small_trainer("--compile", "reduce-overhead")
    g = torch.Generator().manual_seed(1)
    for i in range(8):
        x, y = torch.rand(16, 1, 28, 28, generator=g).cuda(), (torch.arange(16) % 10).cuda()
        if i == 6:
            x[0, 0, 0, 0] = float("nan")
        expected, got = train_step(eager, x, y), train_step(graphed, x, y)
        assert bool(expected[-1]) == bool(got[-1]) == (i != 6)
        torch.testing.assert_close(got[3], expected[3], rtol=1e-3, atol=1e-4, equal_nan=True)
    for a, b in zip(eager.model.state_dict().values(), graphed.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)


def sigterm_at_step(monkeypatch, step: int) -> None:
    """SIGTERM after the `step`-th step of the run (counted over its epochs)."""
    record, steps = epoch.record_step, []

    def record_then_stop(*a, **k):
        record(*a, **k)
        steps.append(None)
        if len(steps) == step:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(epoch, "record_step", record_then_stop)


DIGITS = "--dataset digits --train-samples 256 --batch-size 32 --no-plots".split()


@CUDA
@pytest.mark.parametrize("compile_flags", [[], ["--compile", "reduce-overhead"]])
def test_cuda_run_cut_mid_epoch_resumes(tmp_path, monkeypatch, capsys, compile_flags):
    """A CUDA run stopped by SIGTERM in its second epoch saves a checkpoint and the same command
    resumes it (loading failed on CUDA before: random states moved to the GPU); it ends like an
    uninterrupted run, up to cuDNN's choice of algorithms (losses, accuracies within 1%)."""
    args = [*DIGITS, "--epochs", "2", "--device", "cuda", "--out", str(tmp_path), *compile_flags]
    assert main([*args, "--name", "straight"]) == 0
    sigterm_at_step(monkeypatch, 8 + 3)  # the 3rd step of epoch 2 (8 steps an epoch)
    assert main([*args, "--name", "cut"]) == 128 + signal.SIGTERM
    monkeypatch.undo()
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch_state"]["step"] == 3
    capsys.readouterr()
    assert main([*args, "--name", "cut"]) == 0
    assert "resuming" in capsys.readouterr().out
    names = ("cut", "straight")
    cut, straight = (metrics_without_seconds(tmp_path / n) for n in names)
    assert len(straight) == len(cut) == 2
    for a, b in zip(straight, cut):
        for key in ("train_loss", "test_loss", "test_acc", "ncm_acc"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-2, abs=1e-2), key
    models = [torch.load(tmp_path / n / "checkpoint.pt", weights_only=True)["model"] for n in names]
    torch.testing.assert_close(*models, rtol=1e-2, atol=1e-3)


@CUDA
def test_a_cpu_checkpoint_cut_mid_epoch_resumes_on_cuda(tmp_path, monkeypatch, capsys):
    """A device change is allowed: a CPU run cut mid-epoch resumes with --device cuda (its CPU
    augmentation state does not fit a CUDA generator: the rest of the epoch is re-seeded, with one
    line), and args.json records the new device."""
    args = [*DIGITS, "--epochs", "1", "--out", str(tmp_path)]
    sigterm_at_step(monkeypatch, 3)
    assert main([*args, "--device", "cpu"]) == 128 + signal.SIGTERM
    monkeypatch.undo()
    capsys.readouterr()
    assert main([*args, "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "re-seeded" in out
    args_json = (tmp_path / "standalone-digits-feat=2" / "args.json").read_text()
    assert '"device": "cuda"' in args_json
