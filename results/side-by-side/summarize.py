"""Summarise the side-by-side runs: ours (summary.json, metrics.csv) and the study's code (its printed testset accuracy)."""

import json
import re
import statistics
import sys
from pathlib import Path

here = Path(sys.argv[1])
lines = []
for dim, epochs in ((128, 1), (2, 3)):
    ours, study = [], []
    for s in (0, 1, 2):
        summ = here / f"ours-feat{dim}-seed{s}.json"
        if summ.is_file():
            ours.append(json.loads(summ.read_text())["acc"])
        log = here / f"study-feat{dim}-seed{s}.log"
        if log.is_file():
            accs = re.findall(r"testset accuracy:([0-9.]+)", log.read_text(errors="replace"))
            if len(accs) >= epochs:
                study.append(float(accs[epochs - 1]))
    for name, vals in (("ours", ours), ("study", study)):
        sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
        mean = statistics.mean(vals) if vals else float("nan")
        lines.append(
            f"{dim}-D {epochs} epoch(s) {name}: "
            + ", ".join(f"{v:.4f}" for v in vals)
            + f"; mean {mean:.4f} +- {sd:.4f} (sample std, n={len(vals)})"
        )
print("\n".join(lines))
