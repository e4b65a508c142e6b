#!/usr/bin/env bash
# Ours at 773b607: the same settings and seeds; one thread.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
cd ../sbs-ours
for cfg in "128 1" "2 3"; do set -- $cfg
  for s in 0 1 2; do
    nice -n 10 .venv/bin/python main.py --loss standalone --dataset mnist --data-dir ../shared/data --feat-dim $1 --epochs $2 --seed $s --no-plots --out ../sbs/runs --name ours-feat$1-seed$s > ../sbs/ours-feat$1-seed$s.log 2>&1
    echo "done ours $1 $s rc=$?" >> ../sbs/progress.txt
  done
done
