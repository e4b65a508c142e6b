#!/usr/bin/env bash
# One MNIST epoch of 6,400 train images (50 steps of 128) per run of the device grid, one thread each,
# one run at a time, on the 2-core Intel Xeon shared with the other helpers' jobs (commit 19bc91c).
# Run from the repository root; its output is cpu-epoch.log, each run's metrics.csv row is in cpu-epoch-metrics.csv.
set -u
lscpu | grep "Model name"
git rev-parse --short HEAD
for feat in 2 128; do for loss in xent cent standalone; do
  start=$(date +%s.%N)
  OMP_NUM_THREADS=1 python main.py --loss $loss --dataset mnist --data-dir ../shared/data --feat-dim $feat --epochs 1 --train-samples 6400 --no-plots --device cpu --out runs/device-plan --name $loss-$feat 2>&1 | tail -2
  end=$(date +%s.%N)
  echo "wall $loss feat=$feat: $(echo "$end - $start" | bc) s"
  tail -1 runs/device-plan/$loss-$feat/metrics.csv
done; done
head -1 runs/device-plan/xent-2/metrics.csv
ls -l runs/device-plan/*/checkpoint.pt
