#!/usr/bin/env bash
# Old (5a8228c, a worktree at $BASE) against new (this checkout) fast-path samples/s, interleaved, one thread each.
# OMP_NUM_THREADS=1 BASE=/path/to/worktree-at-5a8228c bash results/speed/step-150/run.sh
set -eu
OUT=$(cd "$(dirname "$0")" && pwd)
NEW=$(cd "$OUT/../../.." && pwd)
for i in 1 2 3; do
  for side in old new; do
    dir=$([ $side = old ] && echo "$BASE" || echo "$NEW")
    (cd "$dir" && .venv/bin/python bench.py --fast-only --data-dir ../shared/data --steps 20 --warmup 3 --rounds 3 --json "$OUT/$side-$i.json" > "$OUT/$side-$i.log" 2>&1)
    python3 -c "import json,sys; d=json.load(open('$OUT/$side-$i.json')); p=d['pipelines']['fast']; print('$side', $i, round(p['samples_per_s'],1), round(p['samples_per_cpu_s'],1), d.get('ops_per_step'))"
  done
done
