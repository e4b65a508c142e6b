#!/usr/bin/env bash
# The whole suite under the torch floor, its record written to results/torch-2.4.1/suite.txt:
#   bash results/torch-2.4.1/run.sh PYTHON "HOW THE VENV WAS MADE"
# PYTHON: the python of a venv holding torch 2.4.1, torchvision 0.19.1 and the rest of requirements.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
python=${1:?usage: run.sh PYTHON "how the venv was made"}
made=${2:?usage: run.sh PYTHON "how the venv was made"}
out=$(mktemp)
# the commit, and whether the tree differs from it, before the record itself is rewritten
commit="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!results/torch-2.4.1' || echo ' with uncommitted changes')"
start=$SECONDS
"$python" -m pytest -q -p no:cacheprovider tests >"$out" 2>&1
rc=$?
{
    echo "# the whole suite: $python -m pytest -q tests, on commit $commit, $(date -u +%F)"
    echo "# $("$python" --version), $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; venv made with: $made"
    echo "# versions: $("$python" -m pip freeze | grep -iE '^(torch|torchvision|numpy|filelock|scikit-learn|pytorch-metric-learning)==' | tr '\n' ' ')"
    grep -E '^(FAILED|ERROR)|[0-9]+ (passed|failed)' "$out" | sed "s#$PWD/##g"
    echo "rc=$rc, $((SECONDS - start)) s wall"
} | sed "s#$(dirname "$python")#VENV/bin#g" >results/torch-2.4.1/suite.txt
rm -f "$out"
cat results/torch-2.4.1/suite.txt
