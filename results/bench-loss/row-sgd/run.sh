#!/usr/bin/env bash
# RowSGD (sort + searchsorted + index_add_, sizes fixed by the batch) against the SparseSGD it replaced
# (coalesce of a sparse gradient) at 5fd2d35, taking turns: old, new, old, new, old, new.
# Run from the repository root with OLD=<a checkout of 5fd2d35>; writes beside this script.
set -eu
here=results/bench-loss/row-sgd
lscpu > "$here/lscpu.txt"
for i in 1 2 3; do
  for which in old new; do
    dir=.; [ "$which" = old ] && dir=$OLD
    (cd "$dir" && OMP_NUM_THREADS=1 "$PY" bench_loss.py --updates sgd --repeats 30) > "$here/$which-$i.txt"
  done
done
