export OMP_NUM_THREADS=1 MPLBACKEND=Agg
lscpu | grep 'Model name'; grep -o -w 'avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u
for i in 1 2 3; do
  cd /work/wt22 && .venv/bin/python bench.py --fast-only --data-dir /work/shared/data --steps 20 --warmup 3 --rounds 3 --json /tmp/bench/new-$i.json > /tmp/bench/new-$i.log 2>&1
  cd /tmp/base && /work/wt22/.venv/bin/python bench.py --fast-only --data-dir /work/shared/data --steps 20 --warmup 3 --rounds 3 --json /tmp/bench/old-$i.json > /tmp/bench/old-$i.log 2>&1
  uptime
done
echo done
