"""Peak memory and time of one main.py run on 100,000 classes: synthetic 8x8 images, 2 a class, 20,000 test images,
standalone loss, 2-D features, 1 epoch of 2,048 train samples (tests/test_many_classes.py's many_class_data).

PYTHONPATH=.:tests python results/many-classes-e2e/measure.py OUT      # from a checkout's root
"""

import json
import resource
import sys
import time

from test_many_classes import many_class_data

import main

main.load_dataset = lambda *a, **k: many_class_data(100_000, 2, 20_000)
flags = [
    "--loss",
    "standalone",
    "--feat-dim",
    "2",
    "--epochs",
    "1",
    "--batch-size",
    "128",
    "--train-samples",
    "2048",
]
start = time.time()
rc = main.main(
    [
        *flags,
        "--out",
        sys.argv[1],
        "--name",
        "faces",
        "--device",
        "cpu",
        "--no-plots",
        "--overwrite",
    ]
)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # KiB on Linux
summary = json.load(open(f"{sys.argv[1]}/faces/summary.json"))
shown = {
    k: summary.get(k)
    for k in ("num_classes", "test_size", "acc", "ncm_acc", "knn1_acc", "precision_at_1", "nmi")
}
print(f"rc {rc}, {time.time() - start:.1f} s, peak RSS {peak} MiB, {shown}")
