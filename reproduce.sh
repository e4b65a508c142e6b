#!/usr/bin/env bash
# Reproduce the study's table: 3 losses x 3 data sets x 2 feature sizes, one main.py run each (and seed).
#
#   DATA_DIR=../shared/data EPOCHS=3 OUT=runs ./reproduce.sh                              # the whole grid
#   DATA_DIR=../shared/data EPOCHS=3 JOBS=3 ./reproduce.sh --amp bf16                     # three runs at a time, extra main.py flags
#   DATA_DIR=../shared/data LOSSES="standalone" DATASETS="mnist" FEAT_DIMS="2" ./reproduce.sh   # a slice of the grid
#   DATA_DIR=../shared/data SEEDS="0 1 2" DATASETS="mnist" EPOCHS=3 ./reproduce.sh       # three seeds of each run
#   DATASETS="digits" EPOCHS=5 ./reproduce.sh                                             # scikit-learn's digits: no DATA_DIR
#
# DATA_DIR holds the data sets (MNIST/raw, FashionMNIST/raw, cifar10-jpg, ...: main.py --data-dir);
# every data set but digits needs it. Seed 0's run is <loss>-<dataset>-feat=<d>, as without SEEDS;
# seed N's is <loss>-<dataset>-feat=<d>-seed=N. A run whose summary.json exists is skipped, so an
# interrupted sweep continues where it stopped (an unfinished run resumes from its checkpoint). Each
# run logs to $OUT/<name>.log. SIGTERM stops the runs with a checkpoint each.
# Then: python report.py $OUT   prints the table beside the study's numbers, the seeds of a run as
# one row (mean ± std, n).
set -u
cd "$(dirname "$0")"
DATA_DIR=${DATA_DIR:-}
SEEDS=${SEEDS:-0}
EPOCHS=${EPOCHS:-100}
OUT=${OUT:-runs}
JOBS=${JOBS:-1}
LOSSES=${LOSSES:-"xent cent standalone"}
DATASETS=${DATASETS:-"mnist fashion-mnist cifar10"}
FEAT_DIMS=${FEAT_DIMS:-"2 128"}
PYTHON=${PYTHON:-python}
if [[ ! $JOBS =~ ^[0-9]+$ ]] || ((10#$JOBS < 1)); then  # else the wait loop below spins (0) or never waits (abc)
    echo "reproduce.sh: error: JOBS must be a positive integer (runs at once), not '$JOBS'" >&2
    exit 2
fi
for seed in $SEEDS; do
    if [[ ! $seed =~ ^[0-9]{1,10}$ ]]; then  # main.py takes 0 to 2**32 - 1; longer ones would overflow here
        echo "reproduce.sh: error: SEEDS must be non-negative integers separated by spaces, not '$SEEDS'" >&2
        exit 2
    fi
done
for arg in "$@"; do
    if [ "$arg" = --seed ] || [[ $arg == --seed=* ]]; then
        echo "reproduce.sh: error: give seeds as SEEDS=\"0 1 2\", not --seed (each seed needs a run folder of its own)" >&2
        exit 2
    fi
done
if [ -z "$DATA_DIR" ]; then
    for dataset in $DATASETS; do
        if [ "$dataset" != digits ]; then
            echo "reproduce.sh: error: DATASETS has $dataset, which needs DATA_DIR (the folder with MNIST/raw, FashionMNIST/raw, cifar10-jpg, ...): e.g. DATA_DIR=../shared/data ./reproduce.sh" >&2
            exit 2
        fi
    done
fi
mkdir -p "$OUT"
failures=$(mktemp)
trap 'rm -f "$failures"' EXIT
# SIGTERM (from timeout, a batch system): pass it on to the runs, which save a checkpoint at the
# next step and exit; the same command later resumes them.
stop_runs() {
    trap - TERM
    echo "SIGTERM: stopping the running runs (each saves a checkpoint; run the same command to resume)"
    for pid in $(jobs -p); do pkill -TERM -P "$pid"; done
    wait
    exit 143
}
trap stop_runs TERM

run_one() {
    local name=$1; shift
    if "$PYTHON" main.py "$@" >"$OUT/$name.log" 2>&1; then
        echo "done $name: $(tail -n 1 "$OUT/$name.log")"
    else
        echo "FAILED $name (exit $?): see $OUT/$name.log"
        echo "$name" >>"$failures"
    fi
}

for dataset in $DATASETS; do
    for feat_dim in $FEAT_DIMS; do
        for loss in $LOSSES; do
            for seed in $SEEDS; do
                name="$loss-$dataset-feat=$feat_dim"
                if ((10#$seed != 0)); then name="$name-seed=$((10#$seed))"; fi
                if [ -f "$OUT/$name/summary.json" ]; then
                    echo "skip $name (finished)"
                    continue
                fi
                data=()  # digits reads no --data-dir (main.py refuses one)
                if [ -n "$DATA_DIR" ] && [ "$dataset" != digits ]; then data=(--data-dir "$DATA_DIR"); fi
                args=(--loss "$loss" --dataset "$dataset" --feat-dim "$feat_dim" --epochs "$EPOCHS" --seed "$((10#$seed))"
                      "${data[@]}" --out "$OUT" --name "$name" "$@")
                while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
                echo "start $name"
                run_one "$name" "${args[@]}" &
            done
        done
    done
done
wait
if [ -s "$failures" ]; then
    echo "$(wc -l <"$failures") run(s) failed: $(tr '\n' ' ' <"$failures")"
    exit 1
fi
