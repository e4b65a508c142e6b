#!/usr/bin/env bash
# Reproduce the study's table: 3 losses x 3 data sets x 2 feature sizes, one main.py run each (and seed).
#
#   DATA_DIR=../shared/data EPOCHS=3 OUT=runs ./reproduce.sh                              # the whole grid
#   DATA_DIR=../shared/data EPOCHS=3 JOBS=3 ./reproduce.sh --amp bf16                     # three runs at a time, extra main.py flags
#   DATA_DIR=../shared/data LOSSES="standalone" DATASETS="mnist" FEAT_DIMS="2" ./reproduce.sh   # a slice of the grid
#   DATA_DIR=../shared/data SEEDS="0 1 2" DATASETS="mnist" EPOCHS=3 ./reproduce.sh       # three seeds of each run
#   DATASETS="digits" EPOCHS=5 TIME_LIMIT=60 ./reproduce.sh                               # digits (no DATA_DIR), stopped after 60 s
#
# DATA_DIR holds the data sets (MNIST/raw, FashionMNIST/raw, cifar10-jpg, ...: main.py --data-dir);
# every data set but digits needs it. Seed 0's run is <loss>-<dataset>-feat=<d>, as without SEEDS;
# seed N's is <loss>-<dataset>-feat=<d>-seed=N. A grid point listed twice runs once. A run whose
# summary.json exists is skipped, so an interrupted sweep continues where it stopped (an unfinished run
# resumes from its checkpoint). Each run appends to $OUT/<name>.log. SIGTERM, or TIME_LIMIT seconds
# after the start, stops the runs with a checkpoint each (exit 143, or 124 for TIME_LIMIT).
# A variable that is set must not be empty. Then: python report.py $OUT   prints the table beside the
# study's numbers, the seeds of a run as one row (mean ± std, n).
set -uf  # -f: a "*" in DATASETS, SEEDS, ... is a name, never a list of files
cd "$(dirname "$0")"
fail() { echo "reproduce.sh: error: $*" >&2; exit 2; }
for var in DATA_DIR SEEDS EPOCHS OUT JOBS LOSSES DATASETS FEAT_DIMS PYTHON TIME_LIMIT; do
    eval "set_=\${$var+set} value=\${$var-}"  # eval, not ${!var}: bash 3.2 (macOS) too
    if [ -n "$set_" ] && [[ -z ${value//[[:space:]]/} ]]; then  # else an empty EPOCHS would mean 100
        fail "$var is set but empty; give it a value or unset it"
    fi
done
DATA_DIR=${DATA_DIR:-}
SEEDS=${SEEDS:-0}
EPOCHS=${EPOCHS:-100}
OUT=${OUT:-runs}
JOBS=${JOBS:-1}
LOSSES=${LOSSES:-"xent cent standalone"}
DATASETS=${DATASETS:-"mnist fashion-mnist cifar10"}
FEAT_DIMS=${FEAT_DIMS:-"2 128"}
PYTHON=${PYTHON:-python}
TIME_LIMIT=${TIME_LIMIT:-0}
if [[ ! $JOBS =~ ^[0-9]+$ ]] || ((10#$JOBS < 1)); then  # else the wait loop below spins (0) or never waits (abc)
    fail "JOBS must be a positive integer (runs at once), not '$JOBS'"
fi
[[ $EPOCHS =~ ^[0-9]{1,6}$ ]] && ((10#$EPOCHS >= 1)) || fail "EPOCHS must be a positive integer, not '$EPOCHS'"
[[ $TIME_LIMIT =~ ^[0-9]{1,9}$ ]] || fail "TIME_LIMIT must be whole seconds (0: none), not '$TIME_LIMIT'"
# "runs " and "runs" look alike in every listing (a folder " " of empty logs was once committed)
[[ $OUT =~ ^[[:space:]]|[[:space:]]$ ]] && fail "OUT '$OUT' starts or ends with whitespace; give it without"
for seed in $SEEDS; do
    # main.py takes 0 to 2**32 - 1; longer ones would overflow here
    [[ $seed =~ ^[0-9]{1,10}$ ]] || fail "SEEDS must be non-negative integers separated by spaces, not '$SEEDS'"
done
for arg do
    if [ "$arg" = --seed ] || [[ $arg == --seed=* ]]; then
        fail "give seeds as SEEDS=\"0 1 2\", not --seed (each seed needs a run folder of its own)"
    fi
done
if [ -z "$DATA_DIR" ]; then
    for dataset in $DATASETS; do
        if [ "$dataset" != digits ]; then
            fail "DATASETS has $dataset, which needs DATA_DIR (the folder with MNIST/raw, FashionMNIST/raw, cifar10-jpg, ...): e.g. DATA_DIR=../shared/data ./reproduce.sh"
        fi
    done
fi
mkdir -p "$OUT"
failures=$(mktemp)
timer=
trap 'rm -f "$failures"; [ -z "$timer" ] || { pkill -P "$timer"; kill "$timer"; } 2>/dev/null' EXIT
# SIGTERM (from timeout, a batch system) or the time limit: pass SIGTERM on to the runs, which save a
# checkpoint at the next step and exit; the same command later resumes them.
stop_runs() {
    trap - TERM USR1
    echo "$1: stopping the running runs (each saves a checkpoint; run the same command to resume)"
    for pid in $(jobs -p); do pkill -TERM -P "$pid"; done  # the runs' main.py, and the timer's sleep
    wait
    exit "$2"
}
trap 'stop_runs SIGTERM 143' TERM
trap 'stop_runs "TIME_LIMIT ($TIME_LIMIT s) reached" 124' USR1
if ((10#$TIME_LIMIT > 0)); then
    (sleep "$((10#$TIME_LIMIT))" && kill -USR1 $$) &
    timer=$!
fi

# Until a run ends: bash >= 4.3 waits for it; macOS's bash 3.2 has no wait -n and polls.
wait_for_a_job() { if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 403)); then wait -n; else sleep 0.2; fi; }

run_one() {
    local name=$1 status; shift
    echo "== $(date -u '+%F %T') main.py $*" >>"$OUT/$name.log"
    "$PYTHON" main.py "$@" >>"$OUT/$name.log" 2>&1
    status=$?
    if ((status == 0)); then
        echo "done $name: $(tail -n 1 "$OUT/$name.log")"
    elif ((status == 130 || status == 143)); then
        echo "stopped $name (checkpoint saved): see $OUT/$name.log"
    else
        echo "FAILED $name (exit $status): see $OUT/$name.log"
        echo "$name" >>"$failures"
    fi
}

listed=" "  # the names seen, space-separated (bash 3.2 has no associative arrays)
for dataset in $DATASETS; do
    for feat_dim in $FEAT_DIMS; do
        for loss in $LOSSES; do
            for seed in $SEEDS; do
                name="$loss-$dataset-feat=$feat_dim"
                if ((10#$seed != 0)); then name="$name-seed=$((10#$seed))"; fi
                if [[ $listed == *" $name "* ]]; then
                    echo "skip $name (listed twice)"  # two runs at once of one folder would share its log
                    continue
                fi
                listed="$listed$name "
                if [ -f "$OUT/$name/summary.json" ]; then
                    echo "skip $name (finished)"
                    continue
                fi
                data=()  # digits reads no --data-dir (main.py refuses one)
                if [ -n "$DATA_DIR" ] && [ "$dataset" != digits ]; then data=(--data-dir "$DATA_DIR"); fi
                args=(--loss "$loss" --dataset "$dataset" --feat-dim "$feat_dim" --epochs "$((10#$EPOCHS))" --seed "$((10#$seed))"
                      ${data[@]+"${data[@]}"} --out "$OUT" --name "$name" ${1+"$@"})  # bash < 4.4: empty arrays are unset
                while [ "$(jobs -rp | grep -cvx "${timer:-none}")" -ge "$JOBS" ]; do wait_for_a_job; done
                echo "start $name"
                run_one "$name" "${args[@]}" &
            done
        done
    done
done
while [ "$(jobs -rp | grep -cvx "${timer:-none}")" -gt 0 ]; do wait_for_a_job; done
if [ -s "$failures" ]; then
    echo "$(wc -l <"$failures") run(s) failed: $(tr '\n' ' ' <"$failures")"
    exit 1
fi
