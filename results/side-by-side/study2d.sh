#!/usr/bin/env bash
# The study's own code: MNIST standalone 2-D, 3 epochs, seeds 0 1 2; one thread, niced.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
cd ../sbs2
for s in 0 1 2; do
  PY=.venv/bin/python nice -n 19 bash ../shared/seed/run-study-code.sh --dataset mnist --epochs 3 --feat_dim 2 --num_workers 1 --seed $s --log_name s2-seed$s > study-feat2-seed$s.log 2>&1
  echo "$(date +%T) done study 2 $s rc=$?" >> progress.txt
done
