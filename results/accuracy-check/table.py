"""docs/speed.md's table of the two pipelines' accuracy: python results/accuracy-check/table.py

Each JSON holds, per seed, the loader path's and the fast path's main.py summaries; the two share the
loader runs, so the fast float32 and fast bf16 columns are paired with the same loader run."""

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent


def accuracies(name: str) -> dict[str, list[float]]:
    seeds = json.loads((HERE / name).read_text())["seeds"]
    return {path: [s["runs"][path]["acc"] for s in seeds] for path in ("loader", "fast")}


def table() -> str:
    """Test acc after 3 epochs per seed; brackets: points against the loader path; last row: bf16
    minus float32 (paired: the same random stream)."""
    fp32, bf16 = accuracies("mnist-3ep-fp32.json"), accuracies("mnist-3ep-bf16.json")
    assert fp32["loader"] == bf16["loader"]
    columns = [fp32["loader"], fp32["fast"], bf16["fast"]]
    lines = ["| seed | loader, float32 | fast, float32 (the default) | fast, bf16 |"]
    lines.append("| ---: | ---: | ---: | ---: |")
    rows = [*(str(s) for s in range(len(columns[0]))), "mean"]
    for i, label in enumerate(rows):
        accs = [statistics.mean(c) if label == "mean" else c[i] for c in columns]
        cells = [f"{accs[0]:.4f}"] + [f"{a:.4f} ({100 * (a - accs[0]):+.2f})" for a in accs[1:]]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    spreads = [f"{100 * (max(c) - min(c)):.2f}" for c in columns]
    lines.append(f"| spread (highest - lowest), points | {' | '.join(spreads)} |")
    diffs = [100 * (b - f) for b, f in zip(bf16["fast"], fp32["fast"])]
    lines.append(
        f"| bf16 - float32, points | | | mean {statistics.mean(diffs):+.2f}, lowest {min(diffs):+.2f} |"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
