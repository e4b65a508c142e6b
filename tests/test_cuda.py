"""The CUDA fast path never waits for the host: training steps of every loss, and one evaluation,
under torch.cuda.set_sync_debug_mode("error"), which raises on any synchronising call (.item(),
a blocking or pageable copy, nonzero, ...), --compile reduce-overhead (CUDA graphs) trains like
the eager step, and a CUDA run cut mid-epoch resumes. The CUDA cases are skipped only where CUDA is absent; the CPU
cases run the same code everywhere, so the harnesses themselves are tested on every machine."""

from __future__ import annotations

import csv
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import epoch  # noqa: E402
from batches import tensor_batches  # noqa: E402
from config import parse_args  # noqa: E402
from datasets import Dataset, ImageData  # noqa: E402
from epoch import record_step  # noqa: E402
from evaluation import acc_predictions, embed, eval_logits  # noqa: E402
from losses import LOSSES  # noqa: E402
from main import main  # noqa: E402
from training import EpochState, build_trainer, cuda_backends, train_step  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
BATCH, STEPS = 32, 4


def synthetic(device: torch.device, classes: int = 10, augment: bool = True) -> Dataset:
    """Random 28x28 grey images (the shape of MNIST) in `classes` classes, on `device`; without `augment`
    none of the random augmentations (whose generators draw differently on the CPU and on CUDA)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (BATCH * (STEPS + 1), 1, 28, 28), generator=g, dtype=torch.uint8)
    train = ImageData(images, torch.arange(len(images)) % classes)
    test = ImageData(images[:100], torch.arange(100) % classes)
    return Dataset(
        "synthetic",
        train.to(device),
        test.to(device),
        [str(k) for k in range(classes)],
        ("flip", "rotate", "crop") if augment else (),
        "test",
    )


def run_steps(
    loss: str, device: str, amp: str, sync_mode: str, classes: int = 10, augment: bool = True
) -> tuple[EpochState, SimpleNamespace, int]:
    """One warm-up step (allocations, cuDNN autotuning), then STEPS steps and an evaluation with
    the given sync debug mode; returns the epoch's accumulators, the run and the test images it gets right."""
    args = parse_args(
        [
            "--loss",
            loss,
            "--device",
            device,
            "--amp",
            amp,
            "--batch-size",
            str(BATCH),
            "--feat-dim",
            "2",
        ]
    )
    dev = torch.device(device)
    data = synthetic(dev, classes, augment)
    run = SimpleNamespace(
        **vars(build_trainer(args, data, dev)),
        args=args,
        device=dev,
        collect_frames=True,
        frame_take=BATCH,
    )
    # RowSGD: many classes
    assert (run.center_optimizer is not None) == (
        classes > BATCH and loss in ("cent", "standalone")
    )
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
        correct = (
            acc_predictions(
                loss, features, logits, centers.detach() if centers is not None else None
            )
            == data.test.labels
        ).sum()
    finally:
        if dev.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    good = state.good_steps()  # fp16: the scaler's first overflows are skipped, and not bad
    assert (
        state.step == STEPS + 1
        and int(state.bad_steps) == 0
        and (good == STEPS + 1 or amp == "fp16")
    )
    # The device's evaluation against the same rule on the CPU, from the same features.
    on_cpu = acc_predictions(
        loss, *(t.detach().cpu() if t is not None else None for t in (features, logits, centers))
    )
    assert int(correct) == int((on_cpu == data.test.labels.cpu()).sum())
    assert torch.isfinite(state.loss_sums).all()
    assert (
        int(state.class_count.sum()) == good * BATCH
        and sum(len(f) for f in state.frame_features) == (STEPS + 1) * BATCH
    )
    return state, run, int(correct)


@pytest.mark.parametrize("classes", [10, 100])
def test_steps_and_evaluation_on_the_cpu(classes):
    run_steps("cent", "cpu", "off", "default", classes)


@CUDA
@pytest.mark.parametrize("loss", LOSSES)
def test_cuda_steps_and_evaluation_never_sync(loss):
    run_steps(loss, "cuda", "off", "error")


@CUDA
@pytest.mark.parametrize("amp", ["off", "fp16"])
@pytest.mark.parametrize("loss", ["cent", "standalone"])
def test_cuda_steps_with_more_classes_than_the_batch_never_sync(loss, amp):
    """100 classes at batch 32: RowSGD steps the batch's centers, every size fixed by the batch (a sparse
    gradient's coalesce() would ask the host for its size); under fp16 its gradient is unscaled on the device."""
    run_steps(loss, "cuda", amp, "error", classes=100)


@CUDA
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_amp_steps_never_sync(amp):
    """fp16 too: the GradScaler's unscale_ and update run on the device, and train_step skips its overflowing steps there."""
    run_steps("standalone", "cuda", amp, "error")


@CUDA
@pytest.mark.parametrize("loss", LOSSES)
def test_cuda_trains_like_the_cpu(loss):
    """The same seed, batches and weights, no augmentation, float32 without TF32 on both (cuda_backends, as
    main.py): after STEPS + 1 steps the summed losses, the per-class feature sums and every weight agree within
    rtol 1e-3, atol 1e-4 (float32 sums in other orders and cuDNN's algorithms, compounded over 5 steps), and
    the test images counted right within 2 of 100 (a point near a boundary may cross it)."""
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


# ------------------------------------------------------------------------------ CUDA graphs


def small_trainer(device: str, flags: tuple[str, ...] = ()):
    args = parse_args(["--dataset", "mnist", "--device", device, "--batch-size", "16", *flags])
    return build_trainer(args, synthetic(torch.device(device)), torch.device(device))


@CUDA
def test_reduce_overhead_trains_like_the_eager_step():
    """--compile --compile reduce-overhead (torch.compile's CUDA graphs) against the eager step on the
    same batches: the same losses and weights up to cuDNN's and inductor's choices, and a NaN batch skipped
    by both."""
    eager, graphed = small_trainer("cuda"), small_trainer("cuda", ("--compile", "reduce-overhead"))
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


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


@CUDA
@pytest.mark.parametrize("compile_flags", [[], ["--compile", "reduce-overhead"]])
def test_cuda_run_cut_mid_epoch_resumes(tmp_path, monkeypatch, capsys, compile_flags):
    """A CUDA run stopped by SIGTERM in its second epoch saves a checkpoint and the same command resumes it
    (loading failed on CUDA before: random states moved to the GPU); it ends like an uninterrupted run, up to
    cuDNN's choice of algorithms (losses and accuracies within 1%, weights close)."""
    args = [
        "--dataset",
        "digits",
        "--train-samples",
        "256",
        "--batch-size",
        "32",
        "--epochs",
        "2",
        "--no-plots",
        "--device",
        "cuda",
    ]
    args += ["--out", str(tmp_path), *compile_flags]
    assert main([*args, "--name", "straight"]) == 0
    steps = {"n": 0}
    record = epoch.record_step

    def record_then_stop(*a, **k):
        record(*a, **k)
        steps["n"] += 1
        if steps["n"] == 8 + 3:  # the 3rd step of epoch 2 (8 steps an epoch)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(epoch, "record_step", record_then_stop)
    assert main([*args, "--name", "cut"]) == 128 + signal.SIGTERM
    monkeypatch.setattr(epoch, "record_step", record)
    assert (
        torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["epoch_state"]["step"]
        == 3
    )
    capsys.readouterr()
    assert main([*args, "--name", "cut"]) == 0
    assert "resuming" in capsys.readouterr().out
    straight, cut = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "cut")
    assert len(straight) == len(cut) == 2
    for a, b in zip(straight, cut):
        for key in ("train_loss", "test_loss", "test_acc", "ncm_acc"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-2, abs=1e-2), key
    ca, cb = (
        torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
        for name in ("straight", "cut")
    )
    for key, value in ca["model"].items():
        torch.testing.assert_close(cb["model"][key], value, rtol=1e-2, atol=1e-3)


@CUDA
def test_a_cpu_checkpoint_cut_mid_epoch_resumes_on_cuda(tmp_path, monkeypatch, capsys):
    """A device change is allowed: a CPU run cut mid-epoch resumes with --device cuda (its CPU augmentation
    state does not fit a CUDA generator: the rest of the epoch is re-seeded, with one line), and args.json
    records the new device."""
    args = [
        "--dataset",
        "digits",
        "--train-samples",
        "256",
        "--batch-size",
        "32",
        "--epochs",
        "1",
        "--no-plots",
        "--out",
        str(tmp_path),
    ]
    record = epoch.record_step

    def record_then_stop(run, state, *a):
        record(run, state, *a)
        if state.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(epoch, "record_step", record_then_stop)
    assert main([*args, "--device", "cpu"]) == 128 + signal.SIGTERM
    monkeypatch.setattr(epoch, "record_step", record)
    capsys.readouterr()
    assert main([*args, "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "re-seeded" in out
    run_dir = tmp_path / "standalone-digits-feat=2"
    assert '"device": "cuda"' in (run_dir / "args.json").read_text()
