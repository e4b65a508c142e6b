"""Small helpers many modules share: devices, seeds, atomic files."""

import contextlib
import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import torch


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, else the CPU; under torchrun each process takes cuda:LOCAL_RANK, and
    cuda:N, which would put every process on one GPU, is a ValueError (choose GPUs by CUDA_VISIBLE_DEVICES)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    indexed = device.type == "cuda" and device.index is not None
    if indexed and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ValueError(
            f"--device {name} under torchrun would put all {os.environ['WORLD_SIZE']} processes on one GPU; give --device cuda (each process takes cuda:LOCAL_RANK) and choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """CPU generator for one epoch's data order, a pure function of (seed, epoch)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class WriteError(Exception):
    """A file that cannot be written (full disk, read-only folder, a link or folder in its place); one line, exit code 1."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `path` via a temporary file beside it, fsync and os.replace: a kill or failure mid-write leaves the old file.
    The temporary name's stale file or planted link is unlinked (never its target) and the file made anew with O_EXCL,
    which never opens through a link; any failure is a WriteError."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        try:
            tmp.unlink(missing_ok=True)
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:  # gone after the replace
            tmp.unlink(missing_ok=True)
        # the rename made durable; Windows cannot open a folder (PermissionError) and needs no such fsync
        with contextlib.suppress(PermissionError):
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
    except OSError as exc:
        raise WriteError(
            f"cannot write {path} ({exc.strerror}); free space or fix the folder and run the same command again"
        ) from None


def atomic_torch_save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON (no NaN or Infinity tokens, which most parsers refuse): a non-finite float becomes null."""
    text = json.dumps(finite_or_none(obj), indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode())


def finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A float as 6 significant digits, None as an empty cell."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:  # csv writes None, and a column the row lacks, as an empty cell
        writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    atomic_write_bytes(path, buffer.getvalue().encode())


CHUNK_BYTES = 64 * 2**20  # the most a chunked distance matrix (evaluation, metrics) holds at a time


def chunk_rows(columns: int, itemsize: int = 4, budget: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that a chunk of `columns` values of `itemsize` bytes fits in `budget` (at least one row):
    100,000 centers in float32 give 167 query rows per 64 MiB of distances."""
    return max(1, budget // max(1, columns * itemsize))
