"""docs/speed.md's table of the public-parts step against 773b607's: python results/speed/public-step/table.py"""

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent


def table() -> str:
    """New (public parts) over old (773b607) per interleaved pair, and the medians."""
    lines = [
        "| pair | new/old samples/s | new/old samples per CPU second |",
        "| ---: | ---: | ---: |",
    ]
    wall, cpu = [], []
    for pair in (1, 2, 3):
        new, old = (
            json.loads((HERE / f"{c}-{pair}.json").read_text())["pipelines"]["fast"]
            for c in ("new", "old")
        )
        # these reports list each round; their figure is the median round
        wall.append(
            statistics.median(new["samples_per_s"]) / statistics.median(old["samples_per_s"])
        )
        cpu.append(
            statistics.median(new["samples_per_cpu_s"])
            / statistics.median(old["samples_per_cpu_s"])
        )
        lines.append(f"| {pair} | {wall[-1]:.2f} | {cpu[-1]:.2f} |")
    lines.append(f"| median | {statistics.median(wall):.2f} | {statistics.median(cpu):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
