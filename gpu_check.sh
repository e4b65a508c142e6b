#!/usr/bin/env bash
# The GPU figures of README's Speed section in one go (planned for about 8 minutes on one H200):
#
#   DATA_DIR=/path/to/data OUT=gpu-check ./gpu_check.sh
#
# 1. bench.py on the GPU: the fast path against the DataLoader path in float32 and in bf16, and the
#    fast path compiled;
# 2. bench_grid.py: the 18-run grid with JOBS runs at once at 1 and 3 epochs, extrapolated to 100.
# DATA_DIR holds MNIST/ and FashionMNIST/ (torchvision's layout) and cifar10-jpg/. Without
# cifar10-jpg/ a stand-in of the same shape is made there (random 32x32 JPEGs, 5,000 train and
# 1,000 test per class): it times like CIFAR-10, but its runs' accuracies mean nothing.
# DEVICE, STEPS and GRID_FLAGS (extra bench_grid.py flags) allow a dry run elsewhere.
set -euo pipefail
cd "$(dirname "$0")"
DATA_DIR=${DATA_DIR:-data}
OUT=${OUT:-gpu-check}
JOBS=${JOBS:-6}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-100}
PYTHON=${PYTHON:-python3}
read -r -a GRID_FLAGS <<<"${GRID_FLAGS:-}"
mkdir -p "$OUT"

if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
"$PYTHON" -c "import os, torch; print('torch', torch.__version__, '| CPUs', os.cpu_count(), '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"

if [ ! -d "$DATA_DIR/cifar10-jpg" ]; then
    echo "no $DATA_DIR/cifar10-jpg: making a CIFAR-10-shaped stand-in (random images; timing only)"
    "$PYTHON" - "$DATA_DIR/cifar10-jpg" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

root, rng = Path(sys.argv[1]), np.random.default_rng(0)
classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
for split, per_class in (("train", 5000), ("test", 1000)):
    for name in classes:
        folder = root / split / name
        folder.mkdir(parents=True)
        for i, pixels in enumerate(rng.integers(0, 256, (per_class, 32, 32, 3), dtype=np.uint8)):
            Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=75)
EOF
fi

bench=("$PYTHON" bench.py --device "$DEVICE" --data-dir "$DATA_DIR" --steps "$STEPS" --warmup 10 --rounds 3)
"${bench[@]}" --json "$OUT/bench-fp32.json"
"${bench[@]}" --amp bf16 --json "$OUT/bench-bf16.json"
"${bench[@]}" --fast-only --compile --json "$OUT/bench-compile.json"
"$PYTHON" bench_grid.py --data-dir "$DATA_DIR" --jobs "$JOBS" --out "${GRID_OUT:-/tmp/gpu-check-grid}" --json "$OUT/grid.json" \
    "${GRID_FLAGS[@]}"
