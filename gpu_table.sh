#!/usr/bin/env bash
# The study's table at its settings (100 epochs, float32) on one GPU, in two parts that each fit
# one device call (a call carries at most 64 MiB and runs at most 10 minutes):
#
#   ./gpu_table.sh pack                        # here, once: .device-data/idx.tgz and cifar10-jpg.tgz
#   OUT=$OUT ./gpu_table.sh idx                # on the GPU: MNIST and Fashion-MNIST, 12 runs
#   OUT=$OUT ./gpu_table.sh cifar              # on the GPU: CIFAR-10, 6 runs
#
# Each part unpacks its data to $DATA_DIR, runs reproduce.sh over its slice of the grid with JOBS
# runs at once into $RUNS, stops them with SIGTERM after BUDGET seconds (each saves a checkpoint:
# the same command on the still-warm machine resumes them), then writes:
#   results/gpu-100ep/<run>.json   the finished runs' summaries (samples/s, peak GPU memory, clean_train_acc)
#   results/gpu-100ep/grid-<part>.json   the part's wall time, JOBS, GPU name, finished and unfinished runs
#   imgs/<run>/train.gif, test.gif  one frame per epoch, for the 2-D runs
# and packs them for the trip back: $OUT/gpu-table-<part>.tgz (summaries, logs, metrics.csv) and one
# $OUT/gifs-<run>.tgz per 2-D run ('=' written '_') (at most 8 files come back from a call, 16 MiB each).
# Here: `tar -xzf gpu-table-idx.tgz` and each gifs-*.tgz in the repository root, then
#   python report.py results/gpu-100ep --readme README.md --label gpu-100ep --columns clean_train_acc,gap
# Extra arguments go to every main.py run (for example --amp bf16 or --compile, to compare speed).
# EPOCHS, JOBS, BUDGET, ARCHIVE, DATA_DIR, RUNS, RESULTS, IMGS and PYTHON allow a dry run on a CPU:
#   EPOCHS=1 JOBS=2 OUT=/tmp/o DATA_DIR=/tmp/d RUNS=/tmp/r RESULTS=/tmp/res IMGS=/tmp/imgs \
#       ./gpu_table.sh cifar --device cpu --train-samples 256 --no-plots
set -euo pipefail
cd "$(dirname "$0")"
PART=${1:-}
shift || true
PYTHON=${PYTHON:-python3}
DATA_DIR=${DATA_DIR:-/tmp/data}
EPOCHS=${EPOCHS:-100}
BUDGET=${BUDGET:-510}
RUNS=${RUNS:-runs/gpu-100ep}
RESULTS=${RESULTS:-results/gpu-100ep}
IMGS=${IMGS:-imgs}

case "$PART" in
pack)
    mkdir -p .device-data
    tar -C ../shared/data -czf .device-data/idx.tgz MNIST FashionMNIST
    tar -C ../shared/data -czf .device-data/cifar10-jpg.tgz cifar10-jpg
    ls -l .device-data
    exit 0
    ;;
idx) DATASETS="mnist fashion-mnist" ARCHIVE=${ARCHIVE:-.device-data/idx.tgz} JOBS=${JOBS:-12} ;;
cifar) DATASETS="cifar10" ARCHIVE=${ARCHIVE:-.device-data/cifar10-jpg.tgz} JOBS=${JOBS:-6} ;;
*)
    echo "gpu_table.sh: error: the first argument must be pack, idx or cifar (got '$PART')" >&2
    exit 2
    ;;
esac
: "${OUT:?gpu_table.sh: error: set OUT to the folder that goes back (\$OUT of the device call)}"
[ -f "$ARCHIVE" ] || { echo "gpu_table.sh: error: $ARCHIVE is missing; run ./gpu_table.sh pack here first" >&2; exit 1; }
mkdir -p "$DATA_DIR" "$RUNS" "$RESULTS" "$OUT"
tar -xzf "$ARCHIVE" -C "$DATA_DIR"

gpu=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')")
echo "torch $("$PYTHON" -c 'import torch; print(torch.__version__)'), $gpu, $(nproc) CPUs, JOBS=$JOBS, EPOCHS=$EPOCHS, flags: $*"
started=$(date +%s)
status=0
DATASETS=$DATASETS EPOCHS=$EPOCHS JOBS=$JOBS OUT=$RUNS DATA_DIR=$DATA_DIR PYTHON=$PYTHON \
    timeout --signal=TERM --kill-after=60 "$BUDGET" ./reproduce.sh "$@" || status=$?
wall=$(($(date +%s) - started))
echo "reproduce.sh exit $status after $wall s"

finished=() unfinished=()
for dataset in $DATASETS; do
    for feat_dim in 2 128; do
        for loss in xent cent standalone; do
            name="$loss-$dataset-feat=$feat_dim"
            if [ -f "$RUNS/$name/summary.json" ]; then finished+=("$name"); else unfinished+=("$name"); fi
        done
    done
done
if [ ${#finished[@]} -gt 0 ]; then
    "$PYTHON" report.py "${finished[@]/#/$RUNS/}" --collect "$RESULTS" --columns samples_per_second,peak_gpu_memory_mb,clean_train_acc
    for name in "${finished[@]}"; do
        case "$name" in *-feat=2) "$PYTHON" visualize.py "$RUNS/$name" --to-imgs --imgs-dir "$IMGS" >/dev/null ;; esac
    done
fi
"$PYTHON" - "$RESULTS/grid-$PART.json" "$wall" "$JOBS" "$EPOCHS" "$gpu" "$status" "${finished[*]:-}" "${unfinished[*]:-}" "$*" <<'EOF'
import json, sys
path, wall, jobs, epochs, gpu, status, done, todo, flags = sys.argv[1:]
report = {"wall_seconds": float(wall), "jobs": int(jobs), "epochs": int(epochs), "gpu": gpu, "reproduce_exit": int(status),
          "finished": done.split(), "unfinished": todo.split(), "main_flags": flags}
open(path, "w").write(json.dumps(report, indent=2) + "\n")
print(json.dumps(report))
EOF

tar -czf "$OUT/gpu-table-$PART.tgz" "$RESULTS" "$RUNS"/*.log "$RUNS"/*/metrics.csv
for name in "${finished[@]}"; do
    case "$name" in *-feat=2) tar -czf "$OUT/gifs-${name/=/_}.tgz" "$IMGS/$name" ;; esac  # '=' may not travel back
done
ls -l "$OUT"
