"""README's batch-gradient ratios, the mean of output.txt's seeds: python results/batch-gradient-ratio/table.py"""

import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent


def table() -> str:
    ratios: dict[tuple[int, int], list[float]] = {}
    for line in (HERE / "output.txt").read_text().splitlines()[2:]:
        feat_dim, batch, _, ratio, _ = line.split()
        ratios.setdefault((int(feat_dim), int(batch)), []).append(float(ratio))
    lines = ["| feat_dim | batch | per-feature gradient, inter over intra (mean of 3 seeds) |"]
    lines.append("| ---: | ---: | ---: |")
    for (feat_dim, batch), values in ratios.items():
        lines.append(f"| {feat_dim} | {batch} | {statistics.mean(values):.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
