#!/usr/bin/env bash
# Ours at 5db38c6: MNIST standalone 128-D, 1 epoch, seeds 0 1 2, the study's settings; one thread a run, niced.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
cd ../sbs-ours
for s in 0 1 2; do
  nice -n 5 .venv/bin/python main.py --loss standalone --dataset mnist --data-dir ../shared/data --feat-dim 128 --epochs 1 --seed $s --threads 1 --no-plots --out ../sbs/runs --name ours-feat128-seed$s > ../sbs/ours-feat128-seed$s.log 2>&1
  echo "$(date +%T) done ours 128 $s rc=$?" >> ../sbs/progress.txt
done
