"""The 3-epoch table before and after the two pipeline fixes: acc of results/cpu-3ep-nearest/ against results/cpu-3ep/.

python results/cpu-3ep-nearest/compare.py                    # print it
python results/cpu-3ep-nearest/compare.py docs/fidelity.md   # and write it between its markers
"""

import json
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1]
START, END = "<!-- table:pipeline-fixes -->", "<!-- /table:pipeline-fixes -->"


def table() -> str:
    lines = [
        "| run | acc, older pipeline | acc, current | change (points) |",
        "| --- | ---: | ---: | ---: |",
    ]
    changes = []
    for dataset in ("mnist", "fashion-mnist", "cifar10"):
        for dim in (2, 128):
            for loss in ("xent", "cent", "standalone"):
                name = f"{loss}-{dataset}-feat={dim}.json"
                old, new = (
                    json.loads((RESULTS / f / name).read_text())["acc"]
                    for f in ("cpu-3ep-nearest", "cpu-3ep")
                )
                changes.append(100 * (new - old))
                lines.append(f"| {name[:-5]} | {old:.4f} | {new:.4f} | {changes[-1]:+.1f} |")
    down, up = sum(c < 0 for c in changes), sum(c > 0 for c in changes)
    lines.append(
        f"\n{down} rows went down and {up} up; the mean change is {statistics.mean(changes):.2f} points, "
        f"the median {statistics.median(changes):.2f}."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    print(text := table())
    for page in map(Path, sys.argv[1:]):
        head, rest = page.read_text().split(START)
        page.write_text(f"{head}{START}\n{text}\n{END}{rest.split(END)[1]}")
