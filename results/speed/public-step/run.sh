#!/usr/bin/env bash
# old (773b607) and new (main's working tree) fast path, interleaved, three pairs, one thread each.
export OMP_NUM_THREADS=1
cd .
for i in 1 2 3; do
  .venv/bin/python bench.py --fast-only --dataset mnist --data-dir ../shared/data --steps 20 --rounds 3 --repo . --json ../benchcmp/new-$i.json > ../benchcmp/new-$i.log 2>&1
  .venv/bin/python bench.py --fast-only --dataset mnist --data-dir ../shared/data --steps 20 --rounds 3 --repo ../oldcode --json ../benchcmp/old-$i.json > ../benchcmp/old-$i.log 2>&1
done
lscpu | grep 'Model name' > ../benchcmp/lscpu.txt
