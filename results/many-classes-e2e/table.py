"""docs/speed.md's memory and time at many classes, from the output.txt of retrieval-memory/ and of
many-classes-e2e/ (each folder's measure.py): python results/many-classes-e2e/table.py"""

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1]
WHAT = {
    "retrieval-memory": "retrieval of 40,000 test images of 20,000 classes",
    "many-classes-e2e": "an epoch of a 100,000-class run, 20,000 test images",
}


def table() -> str:
    lines = ["| measured | code | peak memory | seconds |", "| --- | --- | ---: | ---: |"]
    for folder, what in WHAT.items():
        text = (RESULTS / folder / "output.txt").read_text()
        for label, result in re.findall(r"^((?:old|new)[^\n]*):\n([^\n]*)", text, re.M):
            seconds = re.search(r"([0-9.]+) s,", result)[1]
            peak = int(re.search(r"peak RSS (\d+) MiB", result)[1])
            lines.append(f"| {what} | {label} | {peak / 1024:.1f} GiB | {seconds} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
