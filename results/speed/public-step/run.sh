#!/usr/bin/env bash
# old (773b607) and new (main's working tree) fast path, interleaved, three pairs, one thread each.
export OMP_NUM_THREADS=1
cd /work/main
for i in 1 2 3; do
  .venv/bin/python bench.py --fast-only --dataset mnist --data-dir /work/shared/data --steps 20 --rounds 3 --repo /work/main --json /work/benchcmp/new-$i.json > /work/benchcmp/new-$i.log 2>&1
  .venv/bin/python bench.py --fast-only --dataset mnist --data-dir /work/shared/data --steps 20 --rounds 3 --repo /work/oldcode --json /work/benchcmp/old-$i.json > /work/benchcmp/old-$i.log 2>&1
done
lscpu | grep 'Model name' > /work/benchcmp/lscpu.txt
