"""torchrun: joining the process group, and the gradient-carrying all-gather that lets every rank's
loss see the global batch."""

import contextlib
import gc
import os
import sys
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.constants import default_pg_timeout

T = TypeVar("T")

# what init_process_group's env:// needs besides WORLD_SIZE
TORCHRUN_VARIABLES = ("RANK", "MASTER_ADDR", "MASTER_PORT")
# for every process to reach init_distributed: torchrun starts them together
JOIN_TIMEOUT = timedelta(minutes=5)


class DistributedError(Exception):
    """Processes that did not all join the process group in time; one line, exit code 1."""


def env_integer(name: str, low: int, high: int, what: str) -> int | None:
    """The integer in the environment variable `name` (None when unset); ValueError, with the line to show, unless low <= it <= high."""
    text = os.environ.get(name)
    if text is not None and not (text.strip().isdigit() and low <= int(text) <= high):
        raise ValueError(f"the environment's {name}={text!r} is not {what}; fix or unset it")
    return None if text is None else int(text)


def world_size() -> int:
    """WORLD_SIZE as torchrun sets it, 1 without it; ValueError, with the line to show, for one without torchrun's
    other variables or any of them out of range (RANK and LOCAL_RANK below WORLD_SIZE, MASTER_PORT a port)."""
    world = env_integer("WORLD_SIZE", 1, 2**31 - 1, "a positive number of processes") or 1
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if world > 1 and missing:
        raise ValueError(
            f"the environment has WORLD_SIZE={world} but not {', '.join(missing)}: start with torchrun, or unset WORLD_SIZE"
        )
    rank = f"a process rank from 0 to {world - 1} (WORLD_SIZE {world})"
    for name in ("RANK", "LOCAL_RANK"):
        env_integer(name, 0, world - 1, rank)
    env_integer("MASTER_PORT", 1, 65535, "a port number from 1 to 65535")
    return world


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on the CPU); (rank, world size). All processes meet within
    JOIN_TIMEOUT or DistributedError; init_process_group's own timeout also bounds later collectives, so it stays torch's."""
    world = world_size()
    if world == 1:
        return 0, 1
    if device.type == "cuda":
        torch.cuda.set_device(device)
    me, wait = f"rank {os.environ['RANK']}", f"{JOIN_TIMEOUT.total_seconds():.0f} s"
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    # started by hand, not by torchrun: say what it waits for
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        print(f"{me}: waiting up to {wait} for all {world} processes at {where}", file=sys.stderr)
    # In a thread: the main thread then waits in Python, where SIGINT and SIGTERM take effect at once (main.py's line),
    # not after the C++ wait of up to JOIN_TIMEOUT; a daemon, so that exiting never waits for it.
    joined: list = []
    waiter = threading.Thread(target=rendezvous, args=(joined,), daemon=True)
    waiter.start()
    while waiter.is_alive():
        waiter.join(0.2)
    if isinstance(joined[0], dist.DistError):
        raise DistributedError(
            f"{me}: not all {world} processes met at {where} within {wait} ({str(joined[0]).splitlines()[0]}); start them with torchrun --nproc-per-node {world} main.py ..."
        )
    if isinstance(joined[0], Exception):
        raise joined[0]
    store, rank, _ = joined[0]
    # later waits on the store (NCCL's first collective) get torch's usual time
    store.set_timeout(default_pg_timeout)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world
    )
    return rank, world


def rendezvous(joined: list) -> None:
    """torch's env:// rendezvous (store, rank, world size), or its exception, appended to `joined`."""
    try:
        joined.append(next(dist.rendezvous("env://", timeout=JOIN_TIMEOUT)))
    except Exception as exc:  # re-raised in the main thread
        joined.append(exc)


def close_distributed(finished: bool) -> None:
    """Leave the process group in step, while the interpreter is whole: the DDP wrapper's reference cycles
    keep the gloo group alive past destroy_process_group (freed at shutdown, its threads can abort: SIGABRT),
    so collect them first; after a finished train() wait for rank 0's pictures (after an error, no barrier)."""
    gc.collect()
    if finished:
        # a RuntimeError: another rank has already gone (its own error is the one reported)
        with contextlib.suppress(RuntimeError):
            dist.barrier()
    dist.destroy_process_group()


def from_rank0(value: float, device: torch.device) -> float:
    """Rank 0's value on every rank (a broadcast; the value itself with one process): each rank evaluates in its
    own rounding, and a schedule stepped on each rank's own accuracy could cut the learning rate on some ranks only."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor(value, dtype=torch.float64, device=device)
    dist.broadcast(tensor, 0)
    return float(tensor)


def rank0_first(load: Callable[..., T], *args: object) -> T:
    """load(*args, download=True) on rank 0 before the other ranks, which wait for it at a barrier and then
    read what it wrote, load(*args, download=False): one process downloads a missing data set."""
    if dist.is_initialized() and dist.get_rank() > 0:
        dist.barrier()
        return load(*args, download=False)
    try:
        return load(*args, download=True)
    finally:  # also when it fails: the others then fail to read it, with their own line
        if dist.is_initialized():
            dist.barrier()


def gather_batch(features: Tensor, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The global batch from every rank's slice, gradients flowing back to each slice's owner: every rank's loss
    sees all pairs; the backward sums `world` identical gradients and DDP averages them (1/world), as one process
    holding the whole batch; the centers' gradients are then identical on every rank without communication."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return features, logits, labels
    all_labels = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(all_labels, labels)
    return AllGather.apply(features), AllGather.apply(logits), torch.cat(all_labels)


class AllGather(torch.autograd.Function):
    """Concatenation of every rank's equally sized tensor; backward sums the ranks' gradients and returns this
    rank's slice (all_reduce + slice: gloo has no reduce_scatter). Hand-written because
    torch.distributed.nn.functional.all_gather, equal on gloo (results/all-gather/), is deprecated for a private module."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rows = tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]
