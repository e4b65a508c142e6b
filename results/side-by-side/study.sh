#!/usr/bin/env bash
# The study's own code: 128-D 1 epoch, then 2-D 3 epochs, seeds 0 1 2; one thread.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
cd ../sbs
for cfg in "128 1" "2 3"; do set -- $cfg
  for s in 0 1 2; do
    PY=.venv/bin/python nice -n 10 bash ../shared/seed/run-study-code.sh --dataset mnist --epochs $2 --feat_dim $1 --num_workers 1 --seed $s --log_name s$1-seed$s > study-feat$1-seed$s.log 2>&1
    echo "done study $1 $s rc=$?" >> progress.txt
  done
done
