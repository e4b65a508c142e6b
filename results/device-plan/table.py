"""docs/speed.md's cost and device-call plan, from flops.json (flops.py) and the CPU epochs of
cpu-epoch-metrics.csv (measure.sh): python results/device-plan/table.py

The GPU rows are arithmetic, not measurements: FLOP over an assumed share of an H100's float32 peak."""

import csv
import json
import math
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEAK = 67e12  # an H100's (and H200's) float32 FLOP/s without tensor cores; TF32 is off
TRAIN = {"mnist": 60_000, "fashion-mnist": 60_000, "cifar10": 50_000}
TEST, STUDY_EPOCHS, GRID_EPOCHS, RUNS, EVAL_EVERY = 10_000, 100, 35, 6, 10
# device_call.py: a call's budget less GRACE; the CUDA tests' time in the first call; per-call epochs
DEADLINE, TESTS, PER_CALL = 300 - 45, 120, 12
SETUP = 30  # assumed seconds a call spends unpacking, starting six processes and loading MNIST


def flops() -> dict:
    return json.loads((HERE / "flops.json").read_text())


def cost_table() -> str:
    """What the study's table and the device grid cost in arithmetic, evaluation left out."""
    f = flops()
    side = {"mnist": "28x28x1", "fashion-mnist": "28x28x1", "cifar10": "32x32x3"}
    run = {d: f[f"train_{side[d]}"] * n * STUDY_EPOCHS for d, n in TRAIN.items()}
    table = 2 * 3 * sum(run.values())  # 2 feature sizes x 3 losses a data set
    grid = RUNS * f["train_28x28x1"] * TRAIN["mnist"] * GRID_EPOCHS
    rows = [
        (
            "a training step, 28x28 grey (MNIST, Fashion-MNIST)",
            f"{f['train_28x28x1'] / 1e6:.0f} MFLOP an image",
        ),
        (
            "a training step, 32x32 colour (CIFAR-10)",
            f"{f['train_32x32x3'] / 1e6:.0f} MFLOP an image",
        ),
        ("a 100-epoch run, MNIST or Fashion-MNIST", f"{run['mnist'] / 1e15:.2f} PFLOP"),
        ("a 100-epoch run, CIFAR-10", f"{run['cifar10'] / 1e15:.2f} PFLOP"),
        (
            "the study's 18 runs",
            f"{table / 1e15:.1f} PFLOP, {table / PEAK / 60:.1f} min at the peak",
        ),
        (
            "the 6 MNIST runs at 35 epochs",
            f"{grid / 1e15:.1f} PFLOP, {grid / PEAK:.0f} s at the peak",
        ),
    ]
    lines = ["| what (float32, training only) | arithmetic |", "| --- | ---: |"]
    return "\n".join([*lines, *(f"| {what} | {value} |" for what, value in rows)])


def calls(epoch_s: float) -> list[tuple[int, float]]:
    """(epochs, seconds) of each call until the grid's 35 epochs are done."""
    done, plan = 0, []
    while done < GRID_EPOCHS:
        fixed = SETUP + (TESTS if not plan else 0)
        epochs = min(PER_CALL, GRID_EPOCHS - done, math.floor((DEADLINE - fixed) / epoch_s))
        done += epochs
        plan.append((epochs, fixed + epochs * epoch_s))
    return plan


def plan_table() -> str:
    """The CPU's rates, then the grid at two assumed shares of the GPU's float32 peak."""
    rows = list(csv.DictReader((HERE / "cpu-epoch-metrics.csv").open()))
    rates = [6400 / float(r["seconds"]) for r in rows]
    f = flops()
    train = RUNS * f["train_28x28x1"] * TRAIN["mnist"]
    test = RUNS * f["eval_28x28x1"] * TEST
    clean = RUNS * f["eval_28x28x1"] * TRAIN["mnist"] / EVAL_EVERY  # every 10th epoch, on average
    epoch = train + test + clean
    lines = [
        "| setting | an epoch of the six runs | the grid (35 epochs) | device calls (epochs each) |"
    ]
    lines.append("| --- | ---: | ---: | --- |")
    hours = GRID_EPOCHS * RUNS * TRAIN["mnist"] / statistics.mean(rates) / 3600
    lines.append(
        f"| this CPU, one thread a run: {min(rates):.0f} to {max(rates):.0f} samples/s "
        f"(mean {statistics.mean(rates):.0f}) | | {hours:.0f} thread-hours | |"
    )
    lines.append(
        f"| GPU at its float32 peak, evaluation included ({epoch / (train) - 1:.0%} more) | "
        f"{epoch / PEAK:.1f} s | {GRID_EPOCHS * epoch / 1e15:.1f} PFLOP, {GRID_EPOCHS * epoch / PEAK:.0f} s | |"
    )
    for share in (0.2, 0.05):
        epoch_s = epoch / (share * PEAK)
        plan = calls(epoch_s)
        each = ", ".join(f"{e} in {s:.0f} s" for e, s in plan)
        lines.append(
            f"| GPU at an assumed {share:.0%} of the peak | {epoch_s:.1f} s | {GRID_EPOCHS * epoch_s:.0f} s | "
            f"{len(plan)}: {each} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(cost_table(), plan_table(), sep="\n\n")
