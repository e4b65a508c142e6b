"""README's first-run timings: python results/first-run/threads/table.py

`python main.py` (digits, 20 epochs) at one and two threads, runs 1-6 in their order, read from the
logs here (notes.txt says how they were made)."""

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent


def table() -> str:
    lines = [
        "| run | threads | load average at start | wall | test acc |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for log in sorted(HERE.glob("run*-threads*.log")):
        run, threads = re.fullmatch(r"run(\d+)-threads(\d+)\.log", log.name).groups()
        text = log.read_text()
        load = re.search(r"load average at start: ([0-9.]+)", text)[1]
        wall = float(re.search(r"wall ([0-9.]+) s", text)[1])
        acc = re.search(r"done: acc ([0-9.]+)", text)[1]
        lines.append(f"| {run} | {threads} | {load} | {wall:.1f} s | {acc} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
