"""docs/speed.md's tables from the bench.py reports here: python results/speed/table.py"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETTINGS = {
    "cpu-fp32.json": "float32, channels_last (the defaults)",
    "cpu-fp32-compile.json": "float32, channels_last, compiled",
    "cpu-bf16.json": "bf16 autocast, channels_last",
}


def table() -> str:
    """One row a report: the medians' samples/s and their ratio, and each round's ratio."""
    lines = [
        "| fast path settings | loader samples/s | fast samples/s | ratio (per round) | report |"
    ]
    lines.append("| --- | ---: | ---: | ---: | --- |")
    for name, setting in SETTINGS.items():
        report = json.loads((HERE / name).read_text())
        loader, fast = (report["pipelines"][p]["samples_per_s"] for p in ("loader", "fast"))
        rounds = ", ".join(f"{r:.2f}" for r in report["ratio_per_round"])
        ratio = f"{report['ratio_fast_over_loader']:.2f}x ({rounds})"
        lines.append(f"| {setting} | {loader:.0f} | {fast:.0f} | {ratio} | `{name}` |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
