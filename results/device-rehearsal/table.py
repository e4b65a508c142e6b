"""docs/speed.md's rehearsal: what each call brought back (files.txt): python results/device-rehearsal/table.py"""

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent


def table() -> str:
    text = (HERE / "files.txt").read_text()
    wall = re.search(r"real (\S+)", text)[1]
    lines = [
        f"| call (the whole rehearsal: {wall}) | files | bytes | largest |",
        "| --- | ---: | ---: | --- |",
    ]
    for call, listing in re.findall(r"^(call-\d):\n((?:  .*\n?)+)", text, re.M):
        files = [line.split() for line in listing.strip().splitlines()]
        size, name = max((int(size), name) for size, name in files)
        total = sum(int(size) for size, _ in files)
        lines.append(f"| {call} | {len(files)} | {total:,} | `{name}`, {size / 1e6:.1f} MB |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
