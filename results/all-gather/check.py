"""torch.distributed.nn.functional.all_gather against distributed.AllGather on 2 gloo CPU processes:
the same forward and gradients?  python results/all-gather/check.py  (from the repository root)"""

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.nn.functional import all_gather

sys.path.insert(0, os.getcwd())


def work(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from distributed import AllGather

    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    w = torch.randn(4 * world, 3, generator=torch.Generator().manual_seed(9))
    (torch.cat(all_gather(x)) * w).pow(2).sum().backward()
    library, x.grad = x.grad.clone(), None
    (AllGather.apply(x) * w).pow(2).sum().backward()
    same = torch.equal(torch.cat(all_gather(x)), AllGather.apply(x)) and torch.equal(
        library, x.grad
    )
    print(f"torch {torch.__version__} rank {rank}: forward and gradients equal: {same}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(work, args=(2, port), nprocs=2)
