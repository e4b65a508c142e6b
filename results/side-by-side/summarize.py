"""The side-by-side table: ours (summary.json's acc) against the study's code (its printed testset accuracy).

python results/side-by-side/summarize.py                           # print it
python results/side-by-side/summarize.py README.md docs/fidelity.md  # and write it between their markers
"""

import json
import re
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
START, END = "<!-- table:side-by-side -->", "<!-- /table:side-by-side -->"


def study_acc(log: Path, epoch: int) -> float:
    return float(
        re.findall(r"testset accuracy:([0-9.]+)", log.read_text(errors="replace"))[epoch - 1]
    )


def table() -> str:
    lines = ["| code | setting | seed 0 | seed 1 | seed 2 | mean ± sample std |"]
    lines.append("| --- | --- | ---: | ---: | ---: | ---: |")
    for dim, epochs in ((128, 1), (2, 3)):
        ours = [
            json.loads((HERE / f"ours-feat{dim}-seed{s}.json").read_text())["acc"] for s in range(3)
        ]
        study = [study_acc(HERE / f"study-feat{dim}-seed{s}.log", epochs) for s in range(3)]
        for name, accs in (
            ("ours (`acc`, per image)", ours),
            ("the study's (`testset accuracy`)", study),
        ):
            cells = " | ".join(f"{a:.4f}" for a in accs)
            spread = f"{statistics.mean(accs):.4f} ± {statistics.stdev(accs):.4f}"
            lines.append(
                f"| {name} | {dim}-D, {epochs} epoch{'s' * (epochs > 1)} | {cells} | {spread} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    print(text := table())
    for page in map(Path, sys.argv[1:]):
        head, rest = page.read_text().split(START)
        page.write_text(f"{head}{START}\n{text}\n{END}{rest.split(END)[1]}")
