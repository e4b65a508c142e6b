#!/usr/bin/env bash
# Ours at d388e32: the same settings and seeds; one thread, niced.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
cd ../sbs-main
for s in 0 1 2; do
  nice -n 19 .venv/bin/python main.py --loss standalone --dataset mnist --data-dir ../shared/data --feat-dim 2 --epochs 3 --seed $s --no-plots --out ../sbs2/runs --name ours-feat2-seed$s > ../sbs2/ours-feat2-seed$s.log 2>&1
  echo "$(date +%T) done ours 2 $s rc=$?" >> ../sbs2/progress.txt
done
