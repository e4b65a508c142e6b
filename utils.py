"""Small shared helpers: devices, seeds, random states, atomic files, distances to centers."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from losses import squared_distances


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, else the CPU; under torchrun each process takes cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on the CPU).
    Returns (rank, world size); (0, 1) for a plain single-process run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """CPU generator for one epoch's data order, a pure function of (seed, epoch)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def random_states() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) random states, in types that weights_only loading accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_random_states(states: dict[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file, fsync and rename: a kill mid-write leaves the old file intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_torch_save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON (no NaN or Infinity tokens, which most parsers refuse): a non-finite float becomes null."""
    atomic_write_bytes(path, (json.dumps(finite_or_none(obj), indent=2, sort_keys=False, allow_nan=False) + "\n").encode())


def finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: format_value(row.get(k)) for k in columns})
    atomic_write_bytes(path, buffer.getvalue().encode())


def format_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def nearest(features: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Index of the nearest row of `points` (squared Euclidean distance) for every feature."""
    return squared_distances(features.float(), points.float()).argmin(1)


def step_tensors(modules: list[torch.nn.Module], optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor one training step changes: weights, buffers (BatchNorm statistics), optimizer state."""
    tensors = [t for m in modules for t in m.state_dict(keep_vars=True).values()]
    return tensors + [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]


@torch.no_grad()
def undo_unless(finite: torch.Tensor, tensors: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    """t <- where(finite, t, saved): takes back a non-finite step without a host sync.

    Optimizer state that the step created (`tensors` beyond `saved`: SGD's momentum buffers on the
    first step) goes back to zero, which SGD treats exactly as a missing buffer (dampening 0).
    """
    for i, t in enumerate(tensors):
        torch.where(finite, t, saved[i] if i < len(saved) else t.new_zeros(()), out=t)
