"""The study's results table from run folders, beside the study's own numbers.

    python report.py runs                                  # Markdown table of runs/*/summary.json
    python report.py results/cpu-3ep --columns ncm_acc,best_acc,train_acc
    python report.py runs --collect results/cpu-3ep        # copy each summary.json to results/cpu-3ep/<name>.json
    python report.py results/cpu-3ep --readme README.md --label cpu-3ep   # write between the README markers

Rows follow the study's order (data set, feature size, loss); a row without a run says "missing" and
is never filled in. `study acc` is the study's reported 100-epoch accuracy (study_table.csv, copied
from the study's README); `diff` is ours minus the study's.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
STUDY_TABLE = ROOT / "study_table.csv"
SUMMARY_KEYS = ("name", "loss", "dataset", "feat_dim", "acc", "lr", "epochs", "batch_size", "weight_cent", "weight_intra", "weight_inter")
STUDY_COLUMNS = ["loss", "dataset", "feat_dim", "acc", "lr", "epochs", "batch_size", "weight_cent", "weight_intra", "weight_inter"]


def study_rows() -> list[dict[str, str]]:
    with open(STUDY_TABLE, newline="") as f:
        return list(csv.DictReader(f))


def find_summaries(paths: list[Path]) -> list[Path]:
    """summary.json files of run folders (<dir>/summary.json, <dir>/*/summary.json) and collected <dir>/*.json."""
    found = []
    for path in paths:
        if path.is_file():
            found.append(path)
        elif (path / "summary.json").is_file():
            found.append(path / "summary.json")
        else:
            found += sorted(path.glob("*/summary.json")) + sorted(p for p in path.glob("*.json") if p.name != "args.json")
    return found


class SummaryError(Exception):
    """A summary file the table cannot use; reported as one line naming the file, exit code 1."""


def read_summary(path: Path) -> dict:
    """One summary.json, checked for what the table and --collect use."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SummaryError(f"{path}: not readable as JSON ({str(exc).splitlines()[0]}); rerun its run or remove the file") from None
    if not isinstance(summary, dict):
        raise SummaryError(f"{path}: a JSON {type(summary).__name__}, not a summary object; rerun its run or remove the file")
    missing = [key for key in SUMMARY_KEYS if summary.get(key) is None]
    if missing:
        raise SummaryError(f"{path}: incomplete summary (no {', '.join(missing)}); rerun its run or remove the file")
    name = summary["name"]
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in {"/", os.sep, "\0"}):
        raise SummaryError(
            f"{path}: its name {name!r} is not a plain run folder name (--collect names a file by it); fix or remove the file"
        )
    numbers = ("feat_dim", "acc", "lr", "epochs", "batch_size", "weight_cent", "weight_intra", "weight_inter")
    wrong = [key for key in numbers if not isinstance(summary[key], (int, float)) or isinstance(summary[key], bool)]
    if wrong:
        raise SummaryError(f"{path}: {', '.join(wrong)} should be numbers; rerun its run or remove the file")
    return summary


def load_runs(paths: list[Path]) -> dict[tuple[str, str, int], dict]:
    """Summaries keyed by (loss, dataset, feat_dim); a later duplicate replaces an earlier one."""
    runs = {}
    for path in find_summaries(paths):
        summary = read_summary(path)
        runs[(summary["loss"], summary["dataset"], int(summary["feat_dim"]))] = summary
    return runs


def fmt(value, digits: int = 3) -> str:
    if value is None or value == "":
        return "/"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def weights(loss: str, summary: dict) -> list[str]:
    """weight_cent, weight_intra, weight_inter as the study prints them: '/' where the loss has none."""
    return [
        fmt(summary["weight_cent"], 1) if loss == "cent" else "/",
        fmt(summary["weight_intra"], 1) if loss == "standalone" else "/",
        fmt(summary["weight_inter"], 1) if loss == "standalone" else "/",
    ]


DERIVED = {"gap": ("clean_train_acc", "acc")}  # gap: clean_train_acc - acc, the finished model's train/test gap


def column(summary: dict, name: str) -> object:
    """A summary.json value, or a derived column (DERIVED: the difference of two values)."""
    if name in DERIVED:
        first, second = (summary.get(key) for key in DERIVED[name])
        return first - second if isinstance(first, float) and isinstance(second, float) else None
    return summary.get(name)


def table(runs: dict[tuple[str, str, int], dict], extra: list[str], present_only: bool = False) -> str:
    """Markdown table in the study's layout plus study acc, diff and the extra summary columns;
    a grid point without a run says "missing", or is left out with `present_only`."""
    header = STUDY_COLUMNS + ["study acc", "diff"] + extra
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" :---: " for _ in header) + "|"]
    keys = set()
    for study in study_rows():
        key = (study["loss"], study["dataset"], int(study["feat_dim"]))
        keys.add(key)
        if key in runs or not present_only:
            lines.append(row(key, runs.get(key), float(study["acc"]), extra))
    for key in sorted(set(runs) - keys):  # runs beyond the study's grid
        lines.append(row(key, runs[key], None, extra))
    return "\n".join(lines)


def row(key: tuple[str, str, int], summary: dict | None, study_acc: float | None, extra: list[str]) -> str:
    loss, dataset, feat_dim = key
    study = fmt(study_acc) if study_acc is not None else "/"
    if summary is None:
        cells = [loss, dataset, str(feat_dim), "missing"] + ["missing"] * 6 + [study, "/"] + ["missing"] * len(extra)
    else:
        diff = f"{summary['acc'] - study_acc:+.3f}" if study_acc is not None else "/"
        cells = [
            loss,
            dataset,
            str(feat_dim),
            fmt(summary["acc"]),
            fmt(summary["lr"], 2),
            str(summary["epochs"]),
            str(summary["batch_size"]),
        ]
        cells += weights(loss, summary) + [study, diff] + [fmt(column(summary, name)) for name in extra]
    return "| " + " | ".join(cells) + " |"


def replace_between(text: str, label: str, body: str) -> str:
    start, end = f"<!-- {label} -->", f"<!-- /{label} -->"
    if start not in text or end not in text:
        raise ValueError(f"markers {start} ... {end} not found")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def gallery(imgs_dir: Path, page: Path) -> str:
    """Markdown of the committed pictures for `page`: GIFs of 2-D runs, projections of the others,
    linked relative to the page's folder (docs/results.md links ../imgs/...)."""
    lines = ["| run | train | test |", "| :---: | :---: | :---: |"]
    for folder in sorted(p for p in imgs_dir.iterdir() if p.is_dir()):
        for kind in ("gif", "png"):
            if (folder / f"train.{kind}").is_file() and (folder / f"test.{kind}").is_file():
                rel = Path(os.path.relpath(folder.resolve(), page.resolve().parent)).as_posix()
                lines.append(f"| {folder.name} | ![]({rel}/train.{kind}) | ![]({rel}/test.{kind}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the study's results table from run folders.")
    parser.add_argument("paths", nargs="+", type=Path, help="run folders, folders of run folders, or folders of collected summaries")
    parser.add_argument(
        "--columns", default="ncm_acc", help="extra summary.json keys as columns, comma-separated; gap is clean_train_acc - acc"
    )
    parser.add_argument("--collect", type=Path, help="copy every summary.json to this folder as <run name>.json")
    parser.add_argument("--readme", type=Path, help="write the table into this file between <!-- table:LABEL --> markers")
    parser.add_argument("--label", default="results", help="marker label for --readme")
    parser.add_argument("--present", action="store_true", help="leave out the grid points that have no run (instead of 'missing' rows)")
    parser.add_argument("--gallery", type=Path, help="also write a gallery of this imgs/ folder between <!-- gallery --> markers")
    args = parser.parse_args(argv)
    missing = [p for p in args.paths if not p.exists()]
    if missing:
        parser.error(f"{missing[0]} does not exist")
    try:
        runs = load_runs(args.paths)
    except SummaryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    extra = [c for c in args.columns.split(",") if c]
    text = table(runs, extra, args.present)
    print(text)
    if args.collect:
        args.collect.mkdir(parents=True, exist_ok=True)
        for path in find_summaries(args.paths):
            shutil.copyfile(path, args.collect / f"{read_summary(path)['name']}.json")
    if args.readme:
        try:
            content = replace_between(args.readme.read_text(), f"table:{args.label}", text)
            if args.gallery:
                content = replace_between(content, "gallery", gallery(args.gallery, args.readme))
        except ValueError as exc:
            print(f"error: {args.readme}: {exc}; add them where the table belongs", file=sys.stderr)
            return 1
        args.readme.write_text(content)
    return 0


if __name__ == "__main__":
    sys.exit(main())
