#!/usr/bin/env bash
# One 10-minute GPU call, run as it is: tests/test_cuda.py, then the study's MNIST grid (3 losses x 2 feature
# sizes) through reproduce.sh, stopped with checkpoints before the lease ends; the next call resumes it.
#
#   bash device_check.sh pack        # here, once: .device-data/mnist.tar.xz (MNIST/raw of DATA_DIR, xz), wheels/
#   bash device_check.sh [run FLAGS] # there, OUT set, carry .device-data: brings back $OUT/runs.tgz and logs
#   bash device_check.sh unpack DIR  # here: the files brought back (DIR) into .device-data for the next call
#
# EPOCHS (35: the study's schedule is at lr 8e-5 by then), JOBS (6: every run at once), AMP (off; bf16 runs go to
# runs-bf16), LEASE (600 s), DATASETS (mnist; a data set not in the archive is refused by main.py), PYTHON (python3),
# TESTS (tests/test_cuda.py), STATE (.device-data). FLAGS go to every main.py run. docs/speed.md: why these sizes.
set -u
cd "$(dirname "$0")"
STATE=${STATE:-.device-data}  # ignored by git; the device tool carries it (64 MiB with the working tree)
case "${1:-run}" in
pack)
    mkdir -p "$STATE" && XZ_OPT=-6 tar -C "${DATA_DIR:-../shared/data}" -cJf "$STATE/mnist.tar.xz" MNIST/raw
    python3 -m pip download -q --no-deps --dest "$STATE/wheels" pytorch-metric-learning  # pure Python; the device has no network
    ls -l "$STATE"; exit ;;
unpack)
    cp "${2:?give the folder the device call brought back}/runs.tgz" "$STATE/runs.tgz" && echo "$STATE/runs.tgz: the next call resumes it"
    exit ;;
run) shift $(($# > 0)) ;;
*) echo "device_check.sh: error: unknown command '$1' (pack, unpack DIR, or run [main.py flags] on the device)" >&2; exit 2 ;;
esac
: "${OUT:?device_check.sh: error: set OUT, the folder whose files come back}"
LEASE=${LEASE:-600} AMP=${AMP:-off} PYTHON=${PYTHON:-python3}
[ -f "$STATE/mnist.tar.xz" ] || { echo "device_check.sh: error: $STATE/mnist.tar.xz missing: run 'bash device_check.sh pack' here and carry $STATE" >&2; exit 2; }
data=$(mktemp -d) && tar -C "$data" -xJf "$STATE/mnist.tar.xz"
if ! "$PYTHON" -c 'import pytorch_metric_learning' 2>/dev/null; then  # metrics.py needs it: install the packed wheel
    "$PYTHON" -m pip install -q --no-index --no-deps --target "$data/site" "$STATE"/wheels/*.whl && export PYTHONPATH="$data/site"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "$PYTHON" -c 'import torch; print(torch.__version__)'; } >"$OUT/gpu.txt" 2>&1
timeout 150 "$PYTHON" -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_cuda.py} >"$OUT/cuda-tests.log" 2>&1
echo "${TESTS:-tests/test_cuda.py}: exit $? (last line: $(tail -n 1 "$OUT/cuda-tests.log"))" | tee -a "$OUT/summary.txt"
runs="runs-$AMP"
[ "$AMP" = off ] && runs=runs
[ ! -f "$STATE/runs.tgz" ] || tar -C "$OUT" -xzf "$STATE/runs.tgz"  # the last call's runs: finished ones are skipped, the rest resume
left=$((LEASE - SECONDS - 75))  # 75 s: the runs' checkpoint after SIGTERM, the table, the archive, the trip back
if ((left > 30)); then
    DATA_DIR=$data DATASETS=${DATASETS:-mnist} EPOCHS=${EPOCHS:-35} JOBS=${JOBS:-6} OUT=$OUT/$runs TIME_LIMIT=$left PYTHON=$PYTHON \
        ./reproduce.sh --no-plots --amp "$AMP" "$@" | tee -a "$OUT/summary.txt"
fi
"$PYTHON" report.py "$OUT/$runs" --present --columns ncm_acc,clean_train_acc,gap,samples_per_second >"$OUT/table.md" 2>&1
cat "$OUT/table.md"
tar -C "$OUT" -czf "$OUT/runs.tgz" "$runs" && rm -rf "${OUT:?}/$runs" "$data"
echo "elapsed ${SECONDS}s; $OUT/runs.tgz $(du -h "$OUT/runs.tgz" | cut -f1)" | tee -a "$OUT/summary.txt"
