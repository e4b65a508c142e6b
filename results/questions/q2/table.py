"""docs/questions.md's class-geometry table: each epoch's row of the three runs' metrics.csv.

python results/questions/q2/table.py                     # print it
python results/questions/q2/table.py docs/questions.md   # and write it between its markers
"""

import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
START, END = "<!-- table:questions-q2 -->", "<!-- /table:questions-q2 -->"
COLUMNS = [
    "intra_distance",
    "mean_center_gap",
    "min_center_gap",
    "mean_gap_ratio",
    "min_gap_ratio",
    "feature_norm",
]


def table() -> str:
    rows = [
        pd.read_csv(HERE / f"{loss}-mnist-feat=2" / "metrics.csv").assign(loss=loss)
        for loss in ("xent", "cent", "standalone")
    ]
    frame = pd.concat(rows)[["loss", "epoch", "test_acc", *COLUMNS]].rename(
        columns={"test_acc": "test acc"}
    )
    return frame.to_markdown(index=False, floatfmt=["", "", ".4f", *[".2f"] * len(COLUMNS)])


if __name__ == "__main__":
    print(text := table())
    for page in map(Path, sys.argv[1:]):
        head, rest = page.read_text().split(START)
        page.write_text(f"{head}{START}\n{text}\n{END}{rest.split(END)[1]}")
