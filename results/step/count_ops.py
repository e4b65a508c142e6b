"""Operations per step of a training-step function, by bench.py's counting rule, for code that
bench.py cannot run (the base commit's guarded_step). Run in the repository to measure:

    OMP_NUM_THREADS=1 python results/step/count_ops.py guarded_step     # at commit 5a8228c
    OMP_NUM_THREADS=1 python results/step/count_ops.py train_step       # this branch

resnet, MNIST-shaped input, standalone loss, feat_dim 2, batch 128 (bench.py's defaults), CPU."""

import collections
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path.cwd()))
import training  # noqa: E402
from config import parse_args  # noqa: E402

NO_KERNEL = {
    f"aten::{name}"
    for name in "detach view t expand expand_as unsqueeze squeeze as_strided reshape _reshape_alias flatten unbind select slice "
    "permute transpose alias _unsafe_view view_as split chunk narrow empty empty_like empty_strided resize_ lift_fresh to "
    "contiguous result_type broadcast_tensors".split()
}


def launches(event) -> bool:
    return event.name not in NO_KERNEL or any(launches(c) for c in event.cpu_children if c.name.startswith("aten::"))


torch.set_num_threads(1)
step = getattr(training, sys.argv[1])
images = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8)
data = SimpleNamespace(channels=1, classes=list(range(10)), image_size=28, train=SimpleNamespace(images=images))
trainer = training.build_trainer(parse_args(["--dataset", "mnist"]), data, torch.device("cpu"))
x, y = torch.rand(128, 1, 28, 28), torch.arange(128) % 10
for _ in range(2):
    step(trainer, x, y)
with profile(activities=[ProfilerActivity.CPU]) as prof:
    step(trainer, x, y)
counts = collections.Counter()
for event in prof.events():
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith("aten::"):
        parent = parent.cpu_parent
    if event.name.startswith("aten::") and parent is None and launches(event):
        counts[event.name] += 1
print(sum(counts.values()), dict(counts.most_common()))
