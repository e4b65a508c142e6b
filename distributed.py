"""torchrun: joining the process group, and the gradient-carrying all-gather that lets every rank's
loss see the global batch."""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist

TORCHRUN_VARIABLES = ("RANK", "MASTER_ADDR", "MASTER_PORT")  # what init_process_group's env:// needs besides WORLD_SIZE


def world_size() -> int:
    """The number of processes: WORLD_SIZE as torchrun sets it (with its other variables), 1 without it.
    ValueError, with the line to show, for a WORLD_SIZE that is not a positive integer or that came without torchrun."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(text)
    except ValueError:
        world = 0
    if world < 1:
        raise ValueError(f"the environment's WORLD_SIZE={text!r} is not a positive number of processes; unset it or start with torchrun")
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if world > 1 and missing:
        raise ValueError(
            f"the environment has WORLD_SIZE={world} but not {', '.join(missing)}: start with torchrun --nproc-per-node {world} "
            "main.py ..., or unset WORLD_SIZE for one process"
        )
    return world


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on the CPU).
    Returns (rank, world size); (0, 1) for a plain single-process run."""
    world = world_size()
    if world == 1:
        return 0, 1
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def close_distributed(finished: bool) -> None:
    """Leave the process group in step with the other ranks, while the interpreter is whole.

    The DistributedDataParallel wrapper sits in reference cycles (checked: a wrapper dropped by its
    function stays alive until gc runs) that keep the gloo process group alive past
    destroy_process_group; freed late, at interpreter shutdown, its C++ threads can abort the process
    (SIGABRT, "terminate called without an active exception", seen in the torchrun tests under load).
    So the cycles are collected first. After train() returned (finished or stopped for a signal) every rank also waits at a barrier for rank 0's final
    pictures and summary, so that no rank closes its connections while another still uses them; after
    an error the ranks may not all be here, and a barrier would wait for the dead.
    """
    gc.collect()
    if finished:
        try:
            dist.barrier()
        except RuntimeError:  # another rank has already gone (its own error is the one reported)
            pass
    dist.destroy_process_group()


def gather_batch(features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch from every rank's slice, with gradients flowing back to each slice's owner.

    Every rank then computes the same loss on the whole batch, so the pairwise inter term sees all
    pairs. The all-gather's backward sums the world's identical gradients (a factor `world`) and
    DistributedDataParallel averages over the world (a factor 1/world): the model's gradient equals
    that of one process holding the whole batch. The centers see the whole batch on every rank, so
    their gradients are identical everywhere without communication.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return features, logits, labels
    all_labels = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(all_labels, labels)
    return AllGather.apply(features), AllGather.apply(logits), torch.cat(all_labels)


class AllGather(torch.autograd.Function):
    """Concatenation of every rank's equally sized tensor; backward sums the ranks' gradients and
    returns this rank's slice (all_reduce + slice: gloo has no reduce_scatter)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rows = tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]
