"""The training step from torch's public parts, against what the GPU would check: the fused SGD
kernel's own argument checks, TF32 settings every torch has, the random states a run saves, the
refused CUDA-graph capture with a loader thread, and --compile against the eager step."""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import Mock

import pytest
import torch

import visualize
from config import parse_args
from main import main
from training import build_trainer, cuda_backends, train_step

TINY = "--dataset digits --train-samples 64 --batch-size 32 --no-plots --model lenet++".split()


def trainer(flags: tuple[str, ...], classes: int = 10):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 1, 28, 28), generator=g, dtype=torch.uint8)
    data = SimpleNamespace(channels=1, classes=list(range(classes)), image_size=28)
    data.train = SimpleNamespace(images=images)
    args = parse_args(["--batch-size", "16", "--seed", "3", *flags])
    return build_trainer(args, data, torch.device("cpu"))


def checked_fused_sgd(original):
    """torch._fused_sgd_ with the checks of the CUDA kernel (aten/src/ATen/native/cuda/FusedSgdKernel.cu),
    which the CPU kernel does not make: without momentum buffers the momentum must be 0, with them it
    must be positive and every list as long as the parameters'; params, grads and buffers alike in
    dtype, device, layout, sizes and strides (check_fast_path_restrictions). An empty list is refused too."""
    calls = []

    def fused_sgd(params, grads, momentum_buffer_list, **kwargs):
        assert params, "empty parameter list"
        if not momentum_buffer_list:
            assert kwargs["momentum"] == 0, "momentum without momentum buffers"
        else:
            assert kwargs["momentum"] > 0 and len(momentum_buffer_list) == len(params) == len(grads)
        buffers = [momentum_buffer_list] if momentum_buffer_list else []
        for tensors in zip(params, grads, *buffers):
            kinds = {(t.dtype, t.device, t.layout, t.shape, t.stride()) for t in tensors}
            assert len(kinds) == 1, f"tensors of one parameter differ: {kinds}"
        calls.append(len(params))
        return original(params, grads, momentum_buffer_list, **kwargs)

    return fused_sgd, calls


@pytest.mark.parametrize(
    ("loss", "classes"), [("xent", 10), ("cent", 10), ("standalone", 10), ("cent", 20)]
)  # 20: more classes than the batch
def test_the_fused_sgd_calls_pass_the_cuda_kernels_checks(monkeypatch, loss, classes) -> None:
    fused_sgd, calls = checked_fused_sgd(torch._fused_sgd_)
    monkeypatch.setattr(torch, "_fused_sgd_", fused_sgd)
    t = trainer(("--loss", loss), classes)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        assert train_step(t, torch.rand(16, 1, 28, 28, generator=g), torch.arange(16) % classes)[-1]
    assert len(calls) >= 2  # the kernel did run, once a step at least


def test_a_cpu_run_touches_no_cuda_and_resumes_to_fused_steps_that_pass_the_kernels_checks(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """On a host with GPUs a CPU run never touches CUDA (its RNG getters raise here) and saves the
    CPU generator's state only; a checkpoint holding the old list of every GPU's state resumes on
    the CPU, and the momentum buffers it brings back match their parameters as the fused kernel
    checks (resuming with another --channels-last left them in the saved layout: CUDA refused)."""
    no_cuda = Mock(side_effect=AssertionError("a CPU run initialised CUDA"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("get_rng_state", "get_rng_state_all", "set_rng_state", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    args = [*TINY, "--device", "cpu", "--out", str(tmp_path), "--name", "run"]
    assert main([*args, "--epochs", "1"]) == 0
    path = tmp_path / "run" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt["random"]) == {"torch", "cuda"} and ckpt["random"]["cuda"] is None
    ckpt["random"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 3  # saved on three GPUs
    torch.save(ckpt, path)
    (tmp_path / "run" / "summary.json").unlink()
    fused_sgd, calls = checked_fused_sgd(torch._fused_sgd_)
    monkeypatch.setattr(torch, "_fused_sgd_", fused_sgd)
    capsys.readouterr()
    assert main([*args, "--epochs", "2"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert len(calls) == 2 * 2  # the 2 steps of epoch 2, a call per group (model, centers)


# the old step's empty group; channels_last buffers of NCHW weights
@pytest.mark.parametrize("params", [[], [torch.zeros(2, 3, 4, 4)]], ids=["empty", "strides"])
def test_the_kernel_check_can_fail(params) -> None:
    fused_sgd, _ = checked_fused_sgd(torch._fused_sgd_)
    buffers = [p.to(memory_format=torch.channels_last) for p in params]
    options = dict(weight_decay=0.0, lr=0.1, dampening=0.0, nesterov=False, maximize=False)
    with pytest.raises(AssertionError):
        grads = [torch.zeros_like(p) for p in params]
        fused_sgd(params, grads, buffers, momentum=0.9, is_first_step=False, **options)


def test_tensorboard_distances_use_a_sample_of_many_centers(monkeypatch) -> None:
    """--tensorboard at 100,000 classes: torch.pdist on every center needs 5e9 distances (20 GB); it gets a
    fixed sample of visualize.PDIST_CENTERS, all of them when there are fewer."""
    sizes = []
    monkeypatch.setattr(torch, "pdist", lambda x: sizes.append(tuple(x.shape)) or torch.ones(3))
    writer = SimpleNamespace(add_scalar=lambda *a: None, flush=lambda: None)
    for classes in (100_000, 10):
        visualize.log_tensorboard(writer, 1, {}, torch.randn(classes, 2))
    assert sizes == [(visualize.PDIST_CENTERS, 2), (10, 2)]


def test_tf32_is_off_through_settings_every_torch_has() -> None:
    """cuda_backends turns TF32 off with the flags torch 2.4 already has; they read back, and reading them does not raise."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
    try:
        cudnn.allow_tf32 = matmul.allow_tf32 = True
        cuda_backends(torch.device("cuda"))  # only sets flags: no GPU needed
        assert not cudnn.allow_tf32 and not matmul.allow_tf32
        assert cudnn.benchmark and torch.get_float32_matmul_precision() == "highest"
    finally:
        cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved


def test_reduce_overhead_with_the_loader_pipeline_is_refused(capsys) -> None:
    """CUDA graphs captured while the DataLoader's pin-memory thread makes CUDA calls can break: one line, exit 2."""
    with pytest.raises(SystemExit) as info:
        parse_args(["--compile", "reduce-overhead", "--pipeline", "loader"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2 and "error: --compile reduce-overhead captures CUDA graphs" in err
    assert parse_args(["--compile", "reduce-overhead"]).compile == "reduce-overhead"
    assert parse_args(["--compile"]).compile == "default"


def test_compiled_steps_train_like_the_eager_steps(monkeypatch) -> None:
    """--compile against eager: three steps of LeNet++ on the same batches give the same losses and
    weights up to rounding. torch.compile runs with backend="aot_eager": dynamo's capture and AOTAutograd's
    forward and backward graphs (buffer mutation, the gradients the step reads) without inductor's
    code generation, which takes minutes on two busy cores (the ResNet longer still)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    eager, compiled = trainer(("--model", "lenet++")), trainer(("--model", "lenet++", "--compile"))
    assert compiled.net is not compiled.model  # the step calls the compiled module
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.rand(16, 1, 28, 28, generator=g), torch.arange(16) % 10
        expected, got = train_step(eager, x, y), train_step(compiled, x, y)
        assert bool(got[-1]) and bool(expected[-1])
        torch.testing.assert_close(got[3], expected[3], rtol=1e-4, atol=1e-5)
    weights = [t.model.state_dict() for t in (compiled, eager)]
    torch.testing.assert_close(*weights, rtol=1e-4, atol=1e-5)
    moved = trainer(("--model", "lenet++")).model.embed[1].weight
    assert not torch.equal(eager.model.embed[1].weight, moved)  # the steps moved it
