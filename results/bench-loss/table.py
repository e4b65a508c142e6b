"""docs/speed.md's loss-step tables from the bench_loss.py reports here: python results/bench-loss/table.py

before.json: the centers stepped by torch.optim.SGD on the dense gradient and the paper's update over
a C x m one-hot (before-variant.diff); after.json: the row updates. Times in ms, medians of 30 steps."""

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent


def steps(name: str) -> dict[tuple, dict]:
    rows = json.loads((HERE / name).read_text())["results"]
    return {(r["update"], r["batch"], r["classes"]): r for r in rows}


def ms(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def table() -> str:
    """Step (center update) per setting, then each update's cost at 100,000 over 10 classes."""
    before, after = steps("before.json"), steps("after.json")
    lines = [
        "| update | batch | classes | dense: step (center update), ms | rows: step (center update), ms |"
    ]
    lines.append("| --- | ---: | ---: | ---: | ---: |")
    for key in after:
        cells = [f"{ms(r[key]['step'])} ({ms(r[key]['center_update'])})" for r in (before, after)]
        lines.append(f"| {key[0]} | {key[1]:,} | {key[2]:,} | {' | '.join(cells)} |")
    for update in ("sgd", "paper"):
        cells = [
            f"{r[(update, 128, 100000)]['step'] / r[(update, 128, 10)]['step']:.3g}x"
            for r in (before, after)
        ]
        lines.append(f"| {update} | 128 | 100,000 over 10 | {' | '.join(cells)} |")
    return "\n".join(lines)


def row_sgd_table() -> str:
    """RowSGD (new) against the coalescing optimiser (old), taking turns: the step at 100,000 over 10
    classes, batch 128, each run's median per-round ratio."""
    lines = ["| run | old (coalesced sparse gradient) | new (`RowSGD`) |", "| ---: | ---: | ---: |"]
    for run in (1, 2, 3):
        cells = [
            re.search(r"ratio ([0-9.]+)", (HERE / "row-sgd" / f"{c}-{run}.txt").read_text())[1]
            for c in ("old", "new")
        ]
        lines.append(f"| {run} | {cells[0]}x | {cells[1]}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(), row_sgd_table(), sep="\n\n")
