"""The CUDA fast path never waits for the host: training steps of every loss, and one evaluation,
under torch.cuda.set_sync_debug_mode("error"), which raises on any synchronising call (.item(),
a blocking or pageable copy, nonzero, ...). The CUDA cases are skipped only where CUDA is absent;
the CPU case runs the same code everywhere, so the harness itself is tested on every machine."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from config import parse_args  # noqa: E402
from datasets import Dataset, ImageData, tensor_batches  # noqa: E402
from evaluation import acc_predictions, embed  # noqa: E402
from losses import LOSSES  # noqa: E402
from main import record_step  # noqa: E402
from training import EpochState, build_trainer, train_step  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
BATCH, STEPS = 32, 4


def synthetic(device: torch.device) -> Dataset:
    """Random 28x28 grey images (the shape of MNIST) in 10 classes, on `device`."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (BATCH * (STEPS + 1), 1, 28, 28), generator=g, dtype=torch.uint8)
    train = ImageData(images, torch.arange(len(images)) % 10)
    test = ImageData(images[:100], torch.arange(100) % 10)
    return Dataset("synthetic", train.to(device), test.to(device), [str(k) for k in range(10)], ("flip", "rotate", "crop"), "test")


def run_steps(loss: str, device: str, amp: str, sync_mode: str) -> EpochState:
    """One warm-up step (allocations, cuDNN autotuning), then STEPS steps and an evaluation with
    the given sync debug mode; returns the epoch's accumulators."""
    args = parse_args(["--loss", loss, "--device", device, "--amp", amp, "--batch-size", str(BATCH), "--feat-dim", "2"])
    dev = torch.device(device)
    data = synthetic(dev)
    run = SimpleNamespace(**vars(build_trainer(args, data, dev)), args=args, device=dev, collect_frames=True, frame_take=BATCH)
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
        features, logits = embed(run, data.test)
        centers = run.objective.centers
        correct = (acc_predictions(args, features, logits, centers.detach() if centers is not None else None) == data.test.labels).sum()
    finally:
        if dev.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert state.step == STEPS + 1 and state.good_steps() == STEPS + 1
    assert torch.isfinite(state.loss_sums).all() and 0 <= int(correct) <= 100
    assert int(state.class_count.sum()) == (STEPS + 1) * BATCH and sum(len(f) for f in state.frame_features) == (STEPS + 1) * BATCH
    return state


def test_steps_and_evaluation_on_the_cpu():
    run_steps("cent", "cpu", "off", "default")


@CUDA
@pytest.mark.parametrize("loss", LOSSES)
def test_cuda_steps_and_evaluation_never_sync(loss):
    run_steps(loss, "cuda", "off", "error")


@CUDA
def test_cuda_bf16_steps_never_sync():
    run_steps("standalone", "cuda", "bf16", "error")


@CUDA
def test_sync_debug_mode_catches_a_sync():
    """The check can fail: an .item() in the step is caught."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):
            torch.ones(1, device="cuda").sum().item()
    finally:
        torch.cuda.set_sync_debug_mode("default")
