"""Peak memory and time of metrics.retrieval_scores on 40,000 random 16-D features of 20,000 classes (two images each).

python results/retrieval-memory/measure.py 40000      # from a checkout's root (PYTHONPATH=.)
"""

import resource
import sys
import time

import torch

import metrics

n = int(sys.argv[1])
labels = torch.arange(n // 2).repeat(2)
features = torch.randn(n, 16, generator=torch.Generator().manual_seed(0)) + labels[:, None] * 0.01
start = time.time()
scores = metrics.retrieval_scores(features, labels)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # KiB on Linux
print(f"{n} images, {n // 2} classes: {scores}, {time.time() - start:.1f} s, peak RSS {peak} MiB")
