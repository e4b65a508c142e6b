"""Time of metrics.clustering_scores (scikit-learn k-means, k = classes) on n random D-dimensional features of k classes.

python results/clustering-cost/measure.py 10000 5000 128      # n, classes, D; from a checkout's root (PYTHONPATH=.)
"""

import sys
import time

import torch

import metrics

metrics.CLUSTER_CLASSES = 10**9  # measure past the cap
n, k, d = map(int, sys.argv[1:4])
labels = torch.arange(k).repeat(n // k)
features = torch.randn(n, d, generator=torch.Generator().manual_seed(0)) + labels[:, None] * 0.01
start = time.time()
scores = metrics.clustering_scores(features, labels)
print(f"{n} points, {k} classes, D {d}: NMI, AMI {scores}, {time.time() - start:.1f} s")
