"""The study's results table from run folders, beside the study's own numbers.

    python report.py runs                                  # Markdown table of runs/*/summary.json
    python report.py results/cpu-3ep --columns ncm_acc,best_acc,train_acc
    python report.py runs --collect results/cpu-3ep        # copy each summary.json to results/cpu-3ep/<name>.json
    python report.py results/cpu-3ep --readme README.md --label cpu-3ep   # write between the README markers

Rows follow the study's order (data set, feature size, loss); a row without a run says "missing" and
is never filled in. `study acc` is the study's reported 100-epoch accuracy (study_table.csv, copied
from the study's README); `diff` is ours minus the study's.

Runs whose settings differ only in the seed (and in where and how they ran: NOT_SETTINGS) are one row:
each numeric cell is then mean ± sample standard deviation (ddof 1) over the seeds, and a column `n`
counts them; a table of single runs looks as without seeds.

A run folder without summary.json (stopped before its last epoch, e.g. by a time budget) but with
args.json and metrics.csv is an unfinished row: its last metrics.csv row's test acc and epoch, marked
"unfinished" in the acc and epochs cells, with no diff against the study's 100-epoch figure. --collect
writes such a run as <name>.json with "unfinished": true, so the mark stays in the collected table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

from config import build_parser

ROOT = Path(__file__).resolve().parent
STUDY_TABLE = ROOT / "study_table.csv"
SUMMARY_KEYS = ("name", "loss", "dataset", "feat_dim", "acc", "lr", "epochs", "batch_size", "weight_cent", "weight_intra", "weight_inter")
STUDY_COLUMNS = ["loss", "dataset", "feat_dim", "acc", "lr", "epochs", "batch_size", "weight_cent", "weight_intra", "weight_inter"]
# main.py's flags that say where and how a run ran and was kept, not what it trained: runs that differ
# only in these (and the seed) are seeds of one grid point.
NOT_SETTINGS = frozenset(
    {"name", "out", "data_dir", "device", "workers", "resume", "overwrite", "no_plots", "projection", "plot_every", "tensorboard"}
    | {"eval_every", "compile", "channels_last", "max_bad_steps"}
)
SETTINGS = sorted(set(vars(build_parser().parse_args([]))) - NOT_SETTINGS - {"seed"})
Group = list[dict]  # the summaries of one grid point, one a seed


def study_rows() -> list[dict[str, str]]:
    with open(STUDY_TABLE, newline="") as f:
        return list(csv.DictReader(f))


def find_summaries(paths: list[Path]) -> list[Path]:
    """summary.json files of run folders (<dir>/summary.json, <dir>/*/summary.json), collected <dir>/*.json,
    and the args.json of unfinished run folders (no summary.json, a metrics.csv: read_summary makes their row)."""
    found = []
    for path in paths:
        if path.is_file():
            found.append(path)
        elif (path / "summary.json").is_file():
            found.append(path / "summary.json")
        elif is_unfinished_run(path):
            found.append(path / "args.json")
        else:
            runs = sorted(p for p in path.glob("*/summary.json")) + sorted(p / "args.json" for p in path.glob("*/") if is_unfinished_run(p))
            found += sorted(runs, key=lambda p: p.parent.name) + sorted(p for p in path.glob("*.json") if p.name != "args.json")
    return found


def is_unfinished_run(run_dir: Path) -> bool:
    """A run folder of main.py that has not written summary.json (yet) but has finished an epoch or more."""
    return not (run_dir / "summary.json").exists() and (run_dir / "args.json").is_file() and (run_dir / "metrics.csv").is_file()


def unfinished_summary(args_path: Path) -> dict:
    """The row of an unfinished run: its settings (args.json), and from the last metrics.csv row its test acc
    as acc, its epoch as epochs and the other columns; "unfinished": true, "epochs_planned" the --epochs it ran for."""
    try:
        settings = json.loads(args_path.read_text())
        with open(args_path.parent / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as exc:
        raise SummaryError(
            f"{args_path.parent}: unfinished run not readable ({str(exc).splitlines()[0]}); rerun it or remove the folder"
        ) from None
    if not isinstance(settings, dict) or not rows:
        raise SummaryError(f"{args_path.parent}: unfinished run with no finished epoch in metrics.csv; resume it or remove the folder")
    last = {key: number(value) for key, value in rows[-1].items() if key is not None and key not in settings}  # lr: the scheduled one
    return (
        settings
        | last
        | {
            "name": args_path.parent.name,
            "acc": last.get("test_acc"),
            "epochs": last.get("epoch"),
            "epochs_planned": settings.get("epochs"),
            "unfinished": True,
        }
    )


def number(text: str | None) -> float | int | None:
    """A metrics.csv cell: an int, a float, or None when empty or not a number."""
    try:
        return int(text)
    except (TypeError, ValueError):
        try:
            return float(text)
        except (TypeError, ValueError):
            return None


class SummaryError(Exception):
    """A summary file the table cannot use; reported as one line naming the file, exit code 1."""


def read_summary(path: Path) -> dict:
    """One summary.json (or an unfinished run's args.json: unfinished_summary), checked for what the table and --collect use."""
    try:
        summary = unfinished_summary(path) if path.name == "args.json" else json.loads(path.read_text())
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


def grid_point(summary: dict) -> tuple[str, ...]:
    """Every setting of a run but its seed (SETTINGS; a setting an older summary lacks is null), and
    whether it is unfinished: an unfinished run is never averaged with finished seeds."""
    return (*(json.dumps(summary.get(key)) for key in SETTINGS), json.dumps(bool(summary.get("unfinished"))))


def load_runs(paths: list[Path], notes: list[str] | None = None) -> dict[tuple[str, str, int], list[Group]]:
    """Summaries grouped by grid point, under their study row (loss, dataset, feat_dim). Of two runs
    with equal settings and seed the one found last (the later path argument, then the later file
    name) is kept. `notes` gets a line for each such pair and for each study row with several grid points."""
    points: dict[tuple[str, ...], dict[str, tuple[Path, dict]]] = {}
    for path in find_summaries(paths):
        summary = read_summary(path)
        seeds = points.setdefault(grid_point(summary), {})
        seed = json.dumps(summary.get("seed"))
        if seed in seeds and notes is not None:
            notes.append(
                f"{seeds[seed][0]} and {path} are runs of the same settings and seed {seed}; the table shows {path}, "
                "the one found last (later path argument, then later name)"
            )
        seeds[seed] = (path, summary)
    runs: dict[tuple[str, str, int], list[Group]] = {}
    for point in sorted(points):
        group = [summary for _, summary in points[point].values()]
        runs.setdefault((group[0]["loss"], group[0]["dataset"], int(group[0]["feat_dim"])), []).append(group)
    for (loss, dataset, feat_dim), groups in runs.items():
        differ = [key for key in SETTINGS if len({json.dumps(group[0].get(key)) for group in groups}) > 1]
        if len(groups) > 1 and notes is not None:
            notes.append(f"{loss} {dataset} feat_dim {feat_dim}: {len(groups)} rows, for runs that differ in {', '.join(differ)}")
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


def cell(values: list, digits: int = 3) -> str:
    """A group's values as one cell: one run's value, or a value every seed shares; else the mean ±
    sample std (ddof 1) of those that are numbers, "(n=k)" added when only k of the seeds have one."""
    if len({json.dumps(v) for v in values}) == 1:
        return fmt(values[0], digits)
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not numbers:
        return ", ".join(sorted({fmt(v, digits) for v in values}))
    spread = (
        f"{fmt(statistics.fmean(numbers), digits)} ± {fmt(statistics.stdev(numbers), digits)}"
        if len(numbers) > 1
        else fmt(numbers[0], digits)
    )
    return spread if len(numbers) == len(values) else f"{spread} (n={len(numbers)})"


def known_columns(runs: dict[tuple[str, str, int], list[Group]]) -> set[str]:
    """What --columns can name: every key of the summaries read, and DERIVED."""
    return set(DERIVED).union(*(summary for groups in runs.values() for group in groups for summary in group))


def column(summary: dict, name: str) -> object:
    """A summary.json value, or a derived column (DERIVED: the difference of two values)."""
    if name in DERIVED:
        first, second = (summary.get(key) for key in DERIVED[name])
        return first - second if isinstance(first, float) and isinstance(second, float) else None
    return summary.get(name)


def table(runs: dict[tuple[str, str, int], list[Group]], extra: list[str], present_only: bool = False) -> str:
    """Markdown table in the study's layout plus study acc, diff, n (when a row has several seeds)
    and the extra summary columns; a grid point without a run says "missing", or is left out with `present_only`."""
    seeds = any(len(group) > 1 for groups in runs.values() for group in groups)
    header = STUDY_COLUMNS + ["study acc", "diff"] + ["n"] * seeds + extra
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" :---: " for _ in header) + "|"]
    keys = set()
    for study in study_rows():
        key = (study["loss"], study["dataset"], int(study["feat_dim"]))
        keys.add(key)
        for group in runs.get(key, [] if present_only else [None]):
            lines.append(row(key, group, float(study["acc"]), extra, seeds))
    for key in sorted(set(runs) - keys):  # runs beyond the study's grid
        lines += [row(key, group, None, extra, seeds) for group in runs[key]]
    return "\n".join(lines)


def row(key: tuple[str, str, int], group: Group | None, study_acc: float | None, extra: list[str], seeds: bool) -> str:
    loss, dataset, feat_dim = key
    if group is not None and group[0].get("train_classes"):  # an open-set run classifies fewer classes: not the study's task
        study_acc = None
    study = fmt(study_acc) if study_acc is not None else "/"
    if group is None:
        cells = [loss, dataset, str(feat_dim), "missing"] + ["missing"] * 6 + [study, "/"] + ["missing"] * (seeds + len(extra))
    else:
        first, accs = group[0], [summary["acc"] for summary in group]
        unfinished = any(summary.get("unfinished") for summary in group)  # never compared with the study's 100-epoch figure
        diff = f"{statistics.fmean(accs) - study_acc:+.3f}" if study_acc is not None and not unfinished else "/"
        acc, epochs = cell(accs), str(first["epochs"])
        if unfinished:
            acc, epochs = f"{acc} (unfinished)", f"{epochs} of {first.get('epochs_planned')} (unfinished)"
        cells = [loss, dataset, str(feat_dim), acc, fmt(first["lr"], 2), epochs, str(first["batch_size"])]
        cells += weights(loss, first) + [study, diff] + [str(len(group))] * seeds
        cells += [cell([column(summary, name) for summary in group]) for name in extra]
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
    parser = argparse.ArgumentParser(
        description="Print the study's results table from run folders. Runs whose settings differ only in the seed are one row: "
        "each numeric cell mean ± sample standard deviation (ddof=1) over the seeds, n their number. Of two runs with equal "
        "settings and seed, the one found last (later path argument, then later name) is shown, and a note names both."
    )
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
    problem = output_problem(args)
    if problem:
        parser.error(problem)
    notes: list[str] = []
    try:
        runs = load_runs(args.paths, notes)
    except SummaryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    extra = [c for c in args.columns.split(",") if c]
    known = known_columns(runs)
    unknown = [c for c in extra if c not in known]
    if runs and unknown:
        parser.error(f"--columns: unknown {', '.join(unknown)} (in no summary read); known: {', '.join(sorted(known))}")
    text = table(runs, extra, args.present)
    content = None
    if args.readme:  # read and checked before anything is written
        try:
            content = replace_between(args.readme.read_text(), f"table:{args.label}", text)
            if args.gallery:
                content = replace_between(content, "gallery", gallery(args.gallery, args.readme))
        except (OSError, UnicodeDecodeError) as exc:
            print(f"error: --readme {args.readme}: not readable as text ({exc}); give the Markdown file to write into", file=sys.stderr)
            return 1
        except ValueError as exc:
            print(f"error: {args.readme}: {exc}; add them where the table belongs", file=sys.stderr)
            return 1
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(text)
    try:
        if args.collect:
            args.collect.mkdir(parents=True, exist_ok=True)
            for path in find_summaries(args.paths):
                summary = read_summary(path)
                target = args.collect / f"{summary['name']}.json"
                if summary.get("unfinished") and path.name == "args.json":
                    target.write_text(json.dumps(summary, indent=2) + "\n")
                elif not (target.exists() and target.samefile(path)):  # collecting a folder into itself
                    shutil.copyfile(path, target)
        if content is not None:
            args.readme.write_text(content)
    except OSError as exc:
        print(f"error: {exc.filename}: cannot be written ({exc.strerror}); check --collect and --readme", file=sys.stderr)
        return 1
    return 0


def output_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with --collect, --readme or --gallery before anything is read or written, or None."""
    if args.collect is not None and args.collect.exists() and not args.collect.is_dir():
        return f"--collect {args.collect} is a file, not a folder; it is left alone: give a folder to copy the summaries into"
    if args.readme is not None and not args.readme.is_file():
        what = "is a folder" if args.readme.is_dir() else "does not exist"
        return f"--readme {args.readme} {what}; give the Markdown file that holds the <!-- table:{args.label} --> markers"
    if args.gallery is not None and (args.readme is None or not args.gallery.is_dir()):
        return f"--gallery {args.gallery} needs --readme and must be a folder of run pictures (imgs/)"
    return None


if __name__ == "__main__":
    sys.exit(main())
