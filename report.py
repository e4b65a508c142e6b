"""The study's results table from run folders, beside the study's numbers (study_table.csv: its 100-epoch `study acc`).

    python report.py runs --columns ncm_acc,gap            # Markdown table of runs/*/summary.json, two extra columns
    python report.py runs --collect results/cpu-3ep        # and copy each summary.json to results/cpu-3ep/<name>.json
    python report.py results/cpu-3ep --readme README.md --label cpu-3ep   # write between the README markers

Rows in the study's order; a grid point without a run says "missing"; `diff` is ours minus the study's. Runs that differ only in the
seed (and NOT_SETTINGS) are one row: numeric cells mean ± sample std (ddof 1), a column `n`. A run folder with args.json and
metrics.csv but no summary.json is unfinished: its last epoch, marked, never averaged with finished seeds nor compared with the study.
"""

import argparse
import csv
import json
import os
import shutil
import sys
from pathlib import Path
from statistics import fmean, stdev

from config import build_parser

STUDY_TABLE = Path(__file__).resolve().parent / "study_table.csv"
NUMBERS = (
    "feat_dim",
    "acc",
    "lr",
    "epochs",
    "batch_size",
    "weight_cent",
    "weight_intra",
    "weight_inter",
)
STUDY_COLUMNS = ["loss", "dataset", *NUMBERS]
NOT_SETTINGS = {
    "name",
    "out",
    "data_dir",
    "device",
    "workers",
    "resume",
    "overwrite",
    "no_plots",
    "projection",
    "plot_every",
}
NOT_SETTINGS |= {
    "tensorboard",
    "eval_every",
    "compile",
    "channels_last",
    "max_bad_steps",
}  # runs differing only here are seeds
SETTINGS = sorted(set(vars(build_parser().parse_args([]))) - NOT_SETTINGS - {"seed"})
Runs = dict[
    tuple[str, str, int], list[list[dict]]
]  # study row (loss, dataset, feat_dim): its grid points, each its seeds' summaries
LAST = "the one found last (later path argument, then later name)"  # of two runs with equal settings and seed


class SummaryError(Exception):
    """A summary the table cannot use, or a file report.py cannot read or write: one line naming it, exit code 1."""


def study_rows() -> list[dict[str, str]]:
    return list(csv.DictReader(STUDY_TABLE.read_text().splitlines()))


def unfinished(run: Path) -> bool:
    """A run folder stopped before summary.json, after an epoch or more."""
    return (
        not (run / "summary.json").exists()
        and (run / "args.json").is_file()
        and (run / "metrics.csv").is_file()
    )


def find_summaries(paths: list[Path]) -> list[Path]:
    """summary.json of run folders (<dir>, <dir>/*), collected <dir>/*.json, args.json of unfinished run folders."""
    found = []
    for path in paths:
        if path.is_file() or (path / "summary.json").is_file() or unfinished(path):
            found.append(
                path
                if path.is_file()
                else path / ("summary.json" if (path / "summary.json").is_file() else "args.json")
            )
        else:
            runs = list(path.glob("*/summary.json")) + [
                p / "args.json" for p in path.glob("*/") if unfinished(p)
            ]
            found += sorted(runs, key=lambda p: (p.parent.name, p.name)) + sorted(
                p for p in path.glob("*.json") if p.name != "args.json"
            )
    return found


def number(text: str | None) -> float | int | None:
    try:
        return int(text) if text.lstrip("-").isdigit() else float(text)
    except (AttributeError, ValueError):
        return None


def unfinished_summary(args_path: Path) -> dict:
    """args.json, then the last metrics.csv row (test_acc as acc, epoch as epochs), marked unfinished."""
    try:
        settings = json.loads(args_path.read_text())
        rows = list(csv.DictReader((args_path.parent / "metrics.csv").read_text().splitlines()))
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as exc:
        raise SummaryError(
            f"{args_path.parent}: unfinished run not readable ({str(exc).splitlines()[0]}); rerun or remove it"
        ) from None
    if not isinstance(settings, dict) or not rows:
        raise SummaryError(
            f"{args_path.parent}: unfinished run with no finished epoch in metrics.csv; resume it or remove the folder"
        )
    last = {
        key: number(value)
        for key, value in rows[-1].items()
        if key is not None and key not in settings
    }  # lr: the scheduled one
    mark = {
        "name": args_path.parent.name,
        "acc": last.get("test_acc"),
        "epochs": last.get("epoch"),
        "unfinished": True,
    }
    return settings | last | mark | {"epochs_planned": settings.get("epochs")}


def read_summary(path: Path) -> dict:
    """One summary.json (or an unfinished run's args.json), checked for what the table and --collect use."""
    try:
        summary = (
            unfinished_summary(path) if path.name == "args.json" else json.loads(path.read_text())
        )
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SummaryError(
            f"{path}: not readable as JSON ({str(exc).splitlines()[0]}); rerun its run or remove the file"
        ) from None
    if not isinstance(summary, dict):
        raise SummaryError(
            f"{path}: a JSON {type(summary).__name__}, not a summary object; rerun its run or remove the file"
        )
    if missing := [key for key in ("name", *STUDY_COLUMNS) if summary.get(key) is None]:
        raise SummaryError(
            f"{path}: incomplete summary (no {', '.join(missing)}); rerun its run or remove the file"
        )
    name = summary["name"]
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or any(c in name for c in {"/", os.sep, "\0"})
    ):
        raise SummaryError(
            f"{path}: its name {name!r} is not a plain run folder name (--collect names a file by it); fix or remove it"
        )
    if wrong := [
        key
        for key in NUMBERS
        if not isinstance(summary[key], (int, float)) or isinstance(summary[key], bool)
    ]:
        raise SummaryError(
            f"{path}: {', '.join(wrong)} should be numbers; rerun its run or remove the file"
        )
    return summary


def load_runs(paths: list[Path], notes: list[str] | None = None) -> Runs:
    """Summaries, with gap = clean_train_acc - acc, grouped by grid point (SETTINGS, and whether unfinished); of two runs
    with equal settings and seed the one found last is kept. `notes` gets a line for each such pair and each row of several."""
    notes = [] if notes is None else notes  # the caller's list, which main prints
    points: dict[tuple[str, ...], dict[str, tuple[Path, dict]]] = {}
    for path in find_summaries(paths):
        summary = read_summary(path)
        train, test = (
            summary.get("clean_train_acc"),
            summary["acc"],
        )  # the finished model's train/test gap
        summary["gap"] = (
            train - test if isinstance(train, float) and isinstance(test, float) else None
        )
        point = (
            *(json.dumps(summary.get(key)) for key in SETTINGS),
            json.dumps(bool(summary.get("unfinished"))),
        )
        seeds, seed = points.setdefault(point, {}), json.dumps(summary.get("seed"))
        if seed in seeds:
            notes.append(
                f"{seeds[seed][0]} and {path} are runs of the same settings and seed {seed}; the table shows {path}, {LAST}"
            )
        seeds[seed] = (path, summary)
    runs: Runs = {}
    for point in sorted(points):
        group = [summary for _, summary in points[point].values()]
        runs.setdefault(
            (group[0]["loss"], group[0]["dataset"], int(group[0]["feat_dim"])), []
        ).append(group)
    for (loss, dataset, feat_dim), groups in runs.items():
        if len(groups) > 1:
            differ = [
                key
                for key in SETTINGS
                if len({json.dumps(group[0].get(key)) for group in groups}) > 1
            ]
            notes.append(
                f"{loss} {dataset} feat_dim {feat_dim}: {len(groups)} rows, for runs that differ in {', '.join(differ)}"
            )
    return runs


def fmt(value, digits: int = 3) -> str:
    if value is None or value == "":
        return "/"
    return (
        (f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.0f}")
        if isinstance(value, float)
        else str(value)
    )


def cell(values: list) -> str:
    """One run's value, or one every seed shares; else mean ± sample std (ddof 1) of the numbers, "(n=k)" if only k have one."""
    if len({json.dumps(v) for v in values}) == 1:
        return fmt(values[0])
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not numbers:
        return ", ".join(sorted({fmt(v) for v in values}))
    spread = f"{fmt(fmean(numbers))} ± {fmt(stdev(numbers))}" if numbers[1:] else fmt(numbers[0])
    return spread if len(numbers) == len(values) else f"{spread} (n={len(numbers)})"


def table(runs: Runs, extra: list[str], present_only: bool = False) -> str:
    """Markdown in the study's layout plus study acc, diff, n (when a row has several seeds) and the extra columns."""
    seeds = any(len(group) > 1 for groups in runs.values() for group in groups)
    header = STUDY_COLUMNS + ["study acc", "diff"] + ["n"] * seeds + extra
    lines, keys = (
        ["| " + " | ".join(header) + " |", "|" + "|".join(" :---: " for _ in header) + "|"],
        set(),
    )
    for study in study_rows():
        keys.add(key := (study["loss"], study["dataset"], int(study["feat_dim"])))
        lines += [
            row(key, group, float(study["acc"]), extra, seeds)
            for group in runs.get(key, [] if present_only else [None])
        ]
    lines += [
        row(key, group, None, extra, seeds)
        for key in sorted(set(runs) - keys)
        for group in runs[key]
    ]  # beyond the study's grid
    return "\n".join(lines)


def row(
    key: tuple[str, str, int],
    group: list[dict] | None,
    study_acc: float | None,
    extra: list[str],
    seeds: bool,
) -> str:
    if group is None:
        return (
            "| "
            + " | ".join(
                [
                    *map(str, key),
                    *["missing"] * 7,
                    fmt(study_acc),
                    "/",
                    *["missing"] * (seeds + len(extra)),
                ]
            )
            + " |"
        )
    first, accs = group[0], [summary["acc"] for summary in group]
    study_acc = (
        None if first.get("train_classes") else study_acc
    )  # an open-set run classifies fewer classes: not the study's task
    stopped = any(
        summary.get("unfinished") for summary in group
    )  # never compared with the study's 100-epoch figure
    diff = f"{fmean(accs) - study_acc:+.3f}" if study_acc is not None and not stopped else "/"
    epochs = (
        f"{first['epochs']} of {first.get('epochs_planned')} (unfinished)"
        if stopped
        else str(first["epochs"])
    )
    weights = [
        fmt(first[w], 1) if key[0] == owner else "/"
        for w, owner in zip(NUMBERS[5:], ("cent", "standalone", "standalone"))
    ]
    cells = [
        *map(str, key),
        cell(accs) + " (unfinished)" * stopped,
        fmt(first["lr"], 2),
        epochs,
        str(first["batch_size"]),
        *weights,
    ]
    cells += (
        [fmt(study_acc), diff]
        + [str(len(group))] * seeds
        + [cell([summary.get(name) for summary in group]) for name in extra]
    )
    return "| " + " | ".join(cells) + " |"


def replace_between(text: str, label: str, body: str) -> str:
    start, end = f"<!-- {label} -->", f"<!-- /{label} -->"
    if start not in text or end not in text:
        raise ValueError(f"markers {start} ... {end} not found")
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{body}\n{end}{rest.split(end, 1)[1]}"


def gallery(imgs_dir: Path, page: Path) -> str:
    """Markdown of the committed pictures (GIFs of 2-D runs, projections of the others), linked relative to `page`."""
    lines = ["| run | train | test |", "| :---: | :---: | :---: |"]
    for folder in sorted(p for p in imgs_dir.iterdir() if p.is_dir()):
        for kind in ("gif", "png"):
            if (folder / f"train.{kind}").is_file() and (folder / f"test.{kind}").is_file():
                rel = Path(os.path.relpath(folder.resolve(), page.resolve().parent)).as_posix()
                lines.append(
                    f"| {folder.name} | ![]({rel}/train.{kind}) | ![]({rel}/test.{kind}) |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0] + " Seeds of one grid point: mean ± sample std, n."
    )
    parser.add_argument(
        "paths",
        nargs="+",
        type=Path,
        help="run folders, folders of run folders, or folders of collected summaries",
    )
    parser.add_argument(
        "--columns",
        default="ncm_acc",
        help="extra summary.json keys, comma-separated; gap is clean_train_acc - acc",
    )
    parser.add_argument(
        "--collect", type=Path, help="copy every summary.json to this folder as <run name>.json"
    )
    parser.add_argument(
        "--readme",
        type=Path,
        help="write the table into this file between <!-- table:LABEL --> markers",
    )
    parser.add_argument("--label", default="results", help="marker label for --readme")
    parser.add_argument(
        "--present",
        action="store_true",
        help="leave out the grid points that have no run (instead of 'missing' rows)",
    )
    parser.add_argument(
        "--gallery",
        type=Path,
        help="also write a gallery of this imgs/ folder between <!-- gallery --> markers",
    )
    args = parser.parse_args(argv)
    if missing := [
        p for p in args.paths if not p.exists()
    ]:  # the flags are checked before anything is read or written
        parser.error(f"{missing[0]} does not exist")
    if args.collect and args.collect.exists() and not args.collect.is_dir():
        parser.error(
            f"--collect {args.collect} is a file, not a folder; it is left alone: give a folder to copy the summaries into"
        )
    if args.readme and not args.readme.is_file():
        readme = "is a folder" if args.readme.is_dir() else "does not exist"
        parser.error(
            f"--readme {args.readme} {readme}; give the Markdown file that holds the <!-- table:{args.label} --> markers"
        )
    if args.gallery and not (args.readme and args.gallery.is_dir()):
        parser.error(
            f"--gallery {args.gallery} needs --readme and must be a folder of run pictures (imgs/)"
        )
    try:
        notes: list[str] = []
        runs = load_runs(args.paths, notes)
        extra, known = (
            [c for c in args.columns.split(",") if c],
            set().union(*(s for gs in runs.values() for g in gs for s in g)),
        )
        if runs and (unknown := [c for c in extra if c not in known]):
            parser.error(
                f"--columns: unknown {', '.join(unknown)} (in no summary read); known: {', '.join(sorted(known))}"
            )
        text = table(runs, extra, args.present)
        try:  # the README is read and checked before anything is written
            content = (
                replace_between(args.readme.read_text(), f"table:{args.label}", text)
                if args.readme
                else None
            )
            content = (
                replace_between(content, "gallery", gallery(args.gallery, args.readme))
                if args.gallery
                else content
            )
        except (OSError, UnicodeDecodeError) as exc:
            raise SummaryError(
                f"--readme {args.readme}: not readable as text ({exc}); give the Markdown file to write into"
            ) from None
        except ValueError as exc:
            raise SummaryError(f"{args.readme}: {exc}; add them where the table belongs") from None
        print("".join(f"note: {note}\n" for note in notes), end="", file=sys.stderr)
        print(text)
        try:
            if args.collect:
                args.collect.mkdir(parents=True, exist_ok=True)
            for path in find_summaries(args.paths) if args.collect else []:
                target = args.collect / f"{(summary := read_summary(path))['name']}.json"
                if path.name == "args.json":  # an unfinished run: its summary as the table reads it
                    target.write_text(json.dumps(summary, indent=2) + "\n")
                elif not (
                    target.exists() and target.samefile(path)
                ):  # collecting a folder into itself
                    shutil.copyfile(path, target)
            if content is not None:
                args.readme.write_text(content)
        except OSError as exc:
            raise SummaryError(
                f"{exc.filename}: cannot be written ({exc.strerror}); check --collect and --readme"
            ) from None
        return 0
    except SummaryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
