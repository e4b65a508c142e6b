"""bench_loss.py on tiny sizes: one line per (update, batch, classes) and the ratio lines."""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import check_ok, run_script


def test_bench_loss_prints_every_setting_and_the_ratio(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    flags = ["--classes", "10,3000", "--batches", "8,16", "--feat-dim", "4", "--repeats", "2", "--warmup", "1", "--devices", "cpu"]
    lines = check_ok(run_script("bench_loss.py", [*flags, "--json", report])).stdout.splitlines()
    timing = re.compile(
        r"cpu (sgd|paper) batch (8|16) classes (10|3000): forward [\d.]+ ms, backward [\d.]+ ms, center_update [\d.]+ ms, step ([\d.]+) ms"
    )
    rows = [timing.fullmatch(line) for line in lines if "ratio" not in line]
    assert len(rows) == 8 and all(rows)
    ratios = [line for line in lines if "ratio" in line]
    assert [re.sub(r"ratio [\d.]+", "ratio R", line) for line in ratios] == [
        "cpu: classes 3000 vs 10 at batch 8: ratio R",
        "cpu: classes 3000 vs 10 at batch 8: ratio R (paper)",
    ]
    results = json.loads(report.read_text())["results"]
    step = {(r["update"], r["batch"], r["classes"]): r["step"] for r in results}
    for update, line in zip(("sgd", "paper"), ratios):
        assert float(re.search(r"ratio ([\d.]+)", line).group(1)) == round(step[update, 8, 3000] / step[update, 8, 10], 2)
    assert all(r["step"] > 0 and r["forward"] > 0 for r in results)
