"""The study's results table from run folders, beside the study's numbers (study_table.csv: its 100-epoch `study acc`).

    python report.py runs --columns ncm_acc,gap            # Markdown table of runs/*/summary.json, two extra columns
    python report.py runs --collect results/cpu-3ep        # and copy each summary.json to results/cpu-3ep/<name>.json
    python report.py results/cpu-3ep --readme README.md --label cpu-3ep   # write between the README markers

Rows in the study's order; a grid point without a run says "missing"; `diff` is ours minus the study's. Runs that differ only in the
seed (and NOT_SETTINGS) are one row: numeric cells mean ± sample std (ddof 1), a column `n`. A run folder with args.json and
metrics.csv but no summary.json is unfinished: its last epoch, marked, never averaged with finished seeds nor compared with the study.
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import pandas as pd

from config import build_parser

STUDY_TABLE = Path(__file__).resolve().parent / "study_table.csv"
NUMBERS = "feat_dim acc lr epochs batch_size weight_cent weight_intra weight_inter".split()
STUDY_COLUMNS = ["loss", "dataset", *NUMBERS]
# Where and how a run ran, not what it computed: runs differing only here (and in the seed) are seeds.
NOT_SETTINGS = set(
    "name out data_dir device workers resume overwrite no_plots projection plot_every tensorboard "
    "eval_every compile channels_last max_bad_steps".split()
)
SETTINGS = sorted(set(vars(build_parser().parse_args([]))) - NOT_SETTINGS - {"seed"})
KEY = ["loss", "dataset", "feat_dim"]  # a row of the study's table
# The losses that read weight_cent, weight_intra and weight_inter.
OWNERS = "cent standalone standalone".split()
LAST = "the one found last (later path argument, then later name)"  # of two runs with equal settings and seed


class SummaryError(Exception):
    """A summary the table cannot use, or a file report.py cannot read: one line naming it, exit code 1."""


def study_rows() -> list[dict]:
    return pd.read_csv(STUDY_TABLE).to_dict("records")


def unfinished(run: Path) -> bool:
    """A run folder stopped before summary.json, after an epoch or more."""
    return not (run / "summary.json").exists() and all(
        (run / f).is_file() for f in ("args.json", "metrics.csv")
    )


def find_summaries(paths: list[Path]) -> list[Path]:
    """summary.json of run folders (<dir>, <dir>/*), collected <dir>/*.json, args.json of unfinished run folders."""
    found = []
    for path in paths:
        if path.is_file():
            found.append(path)
        elif (path / "summary.json").is_file() or unfinished(path):
            found.append(path / ("args.json" if unfinished(path) else "summary.json"))
        else:
            runs = [p / "args.json" for p in path.glob("*/") if unfinished(p)]
            runs += path.glob("*/summary.json")
            found += sorted(runs, key=lambda p: (p.parent.name, p.name))
            found += sorted(p for p in path.glob("*.json") if p.name != "args.json")
    return found


def unfinished_summary(args_path: Path) -> dict:
    """args.json, then the last metrics.csv row (test_acc as acc, epoch as epochs), marked unfinished."""
    run = args_path.parent
    try:
        settings = json.loads(args_path.read_text())
        rows = pd.read_csv(run / "metrics.csv").to_dict("records")
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # pandas' parse errors are ValueErrors
        raise SummaryError(f"{run}: unfinished, unreadable ({str(exc).splitlines()[0]})") from None
    if not isinstance(settings, dict) or not rows:
        raise SummaryError(f"{run}: no finished epoch in metrics.csv; resume or remove it")
    # The last row's values (lr: the scheduled one), under the settings' names where they differ.
    last = {k: None if pd.isna(v) else v for k, v in rows[-1].items() if k not in settings}
    mark = {"name": run.name, "acc": last.get("test_acc"), "epochs": last.get("epoch")}
    return settings | last | mark | {"unfinished": True, "epochs_planned": settings.get("epochs")}


def read_summary(path: Path) -> dict:
    """One summary.json (or an unfinished run's args.json), checked for what the table and --collect use."""

    def refuse(what: str, fix: str = "rerun its run or remove the file"):
        raise SummaryError(f"{path}: {what}; {fix}")

    try:
        summary = (
            unfinished_summary(path) if path.name == "args.json" else json.loads(path.read_text())
        )
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        refuse(f"not readable as JSON ({str(exc).splitlines()[0]})")
    if not isinstance(summary, dict):
        refuse(f"a JSON {type(summary).__name__}, not a summary object")
    if missing := [key for key in ("name", *STUDY_COLUMNS) if summary.get(key) is None]:
        refuse(f"incomplete summary (no {', '.join(missing)})")
    name = summary["name"]
    # --collect names a file by it
    if not isinstance(name, str) or name in ("", ".", "..") or {"/", os.sep, "\0"} & set(name):
        refuse(f"its name {name!r} is not a plain run folder name", "fix or remove it")
    if wrong := [key for key in NUMBERS if not is_number(summary[key])]:
        refuse(f"{', '.join(wrong)} should be numbers")
    return summary


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_runs(paths: list[Path], notes: list[str] | None = None) -> pd.DataFrame:
    """Summaries, one row each, with gap = clean_train_acc - acc and `point` (SETTINGS and whether unfinished: one table
    row); of two runs with equal point and seed the one found last is kept. `notes` gets a line for each such pair and
    each study row of several table rows."""
    notes = [] if notes is None else notes  # the caller's list, which main prints
    kept: dict[tuple[str, str], tuple[Path, dict]] = {}
    for path in find_summaries(paths):
        s = read_summary(path)
        train, test = s.get("clean_train_acc"), s["acc"]  # the finished model's train/test gap
        s["gap"] = train - test if isinstance(train, float) and isinstance(test, float) else None
        s["point"] = json.dumps([s.get(key) for key in SETTINGS] + [bool(s.get("unfinished"))])
        if (run := (s["point"], json.dumps(s.get("seed")))) in kept:
            notes.append(f"{kept[run][0]}, {path}: same settings, seed {run[1]}; shown: {LAST}")
        kept[run] = (path, s)
    keys = set().union(*(s for _, s in kept.values()))  # a key a summary lacks is None, not NaN
    runs = pd.DataFrame([{k: s.get(k) for k in keys} for _, s in kept.values()], dtype=object)
    if runs.empty:
        return runs
    runs["feat_dim"] = runs["feat_dim"].astype(int)
    runs = runs.sort_values("point", kind="stable")
    for (loss, dataset, feat_dim), rows in runs.groupby(KEY):
        if len(p := rows.drop_duplicates("point")) > 1:  # one row per point
            differ = ", ".join(k for k in SETTINGS if k in p and p[k].map(json.dumps).nunique() > 1)
            notes.append(f"{loss} {dataset} feat_dim {feat_dim}: {len(p)} rows; {differ} differ")
    return runs


def fmt(value, digits: int = 3) -> str:
    if value is None or value == "":
        return "/"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def table(runs: pd.DataFrame, extra: list[str], present_only: bool = False) -> str:
    """Markdown in the study's layout plus study acc, diff, n (when a row has several seeds) and the extra columns."""
    columns = ["acc", *extra]
    runs = pd.DataFrame(columns=["point", *KEY, *columns]) if runs.empty else runs
    points = runs.groupby("point", sort=True)
    seeds = bool((points.size() > 1).any())
    header = STUDY_COLUMNS + ["study acc", "diff"] + ["n"] * seeds + extra
    # The seeds' numbers give mean, std and count; a value every seed shares (any type) is shown as is.
    numbers = runs[columns].map(lambda v: v if is_number(v) else None).astype(float)
    stats = numbers.groupby(runs["point"]).agg(["mean", "std", "count"])
    same = runs[columns].map(json.dumps).groupby(runs["point"]).nunique() == 1
    missing = ["missing"] * (seeds + len(extra))  # the extra cells of a grid point without a run

    def cell(point: str, rows: pd.DataFrame, column: str) -> str:
        """One run's value, or one every seed shares; else mean ± sample std (ddof 1), "(n=k)" if only k have one."""
        mean, std, count = stats.loc[point, column]
        if same.loc[point, column]:
            return fmt(rows[column].iloc[0])
        if not count:
            return ", ".join(sorted({fmt(v) for v in rows[column]}))
        spread = f"{fmt(mean)} ± {fmt(std)}" if count > 1 else fmt(mean)
        return spread if count == len(rows) else f"{spread} (n={count:.0f})"

    def row(key: tuple, point: str | None, study_acc: float | None) -> list[str]:
        if point is None:
            return [*map(str, key), *["missing"] * 7, fmt(study_acc), "/", *missing]
        rows = points.get_group(point)
        first = rows.iloc[0]
        # An unfinished run is never compared with the study, nor an open-set one (fewer classes: another task).
        stopped = "unfinished" in rows and bool(rows["unfinished"].eq(True).any())
        study_acc = None if first.get("train_classes") else study_acc
        compared = study_acc is not None and not stopped  # diff
        return [
            *map(str, key),
            cell(point, rows, "acc") + " (unfinished)" * stopped,
            fmt(first["lr"], 2),
            f"{first['epochs']}" + f" of {first.get('epochs_planned')} (unfinished)" * stopped,
            str(first["batch_size"]),
            *(fmt(first[w], 1) if key[0] == o else "/" for w, o in zip(NUMBERS[5:], OWNERS)),
            fmt(study_acc),
            f"{stats.loc[point, ('acc', 'mean')] - study_acc:+.3f}" if compared else "/",
            *[str(len(rows))] * seeds,
            *(cell(point, rows, name) for name in extra),
        ]

    by_key = {key: list(group["point"].unique()) for key, group in runs.groupby(KEY)}
    lines = []
    for study in study_rows():
        key = (study["loss"], study["dataset"], int(study["feat_dim"]))
        lines += [row(key, p, study["acc"]) for p in by_key.pop(key, [None] * (not present_only))]
    lines += [row(key, p, None) for key in sorted(by_key) for p in by_key[key]]  # beyond the study
    return pd.DataFrame(lines, columns=header).to_markdown(
        index=False, colalign=["center"] * len(header), disable_numparse=True
    )


def fill(readme: Path, label: str, text: str, imgs: Path | None) -> str:
    """The README with `text` (and a gallery of `imgs`) between their markers, read and checked before anything is written."""
    try:
        content = readme.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SummaryError(f"--readme {readme}: not readable as text ({exc})") from None
    blocks = {label: text, **({"gallery": gallery(imgs, readme)} if imgs else {})}
    for name, body in blocks.items():
        start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
        if start not in content or end not in content:
            raise SummaryError(f"{readme}: markers {start} ... {end} not found; add them")
        head, rest = content.split(start, 1)
        content = f"{head}{start}\n{body}\n{end}{rest.split(end, 1)[1]}"
    return content


def gallery(imgs_dir: Path, page: Path) -> str:
    """Markdown of the committed pictures (GIFs of 2-D runs, projections of the others), linked relative to `page`."""
    lines = ["| run | train | test |", "| :---: | :---: | :---: |"]
    for run in sorted(p for p in imgs_dir.iterdir() if p.is_dir()):
        for kind in ("gif", "png"):
            if (run / f"train.{kind}").is_file() and (run / f"test.{kind}").is_file():
                rel = Path(os.path.relpath(run.resolve(), page.resolve().parent)).as_posix()
                lines.append(f"| {run.name} | ![]({rel}/train.{kind}) | ![]({rel}/test.{kind}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0] + " Seeds of one grid point: mean ± sample std, n."
    )
    add = parser.add_argument
    add("paths", nargs="+", type=Path, help="run folders, their folders, or collected summaries")
    add("--columns", default="ncm_acc", help="extra summary keys, a,b; gap: clean_train_acc - acc")
    add("--collect", type=Path, help="copy every summary.json to this folder as <run name>.json")
    add("--readme", type=Path, help="write the table into this file between table:LABEL markers")
    add("--label", default="results", help="marker label for --readme")
    add("--present", action="store_true", help="no 'missing' rows for grid points without a run")
    add("--gallery", type=Path, help="also a gallery of this imgs/ folder between gallery markers")
    args = parser.parse_args(argv)
    readme, label = args.readme, f"table:{args.label}"
    # The flags are checked before anything is read or written.
    if missing := [p for p in args.paths if not p.exists()]:
        parser.error(f"{missing[0]} does not exist")
    if args.collect and args.collect.exists() and not args.collect.is_dir():
        parser.error(f"--collect {args.collect} is a file, not a folder, left alone; give a folder")
    if readme and not readme.is_file():
        kind = "is a folder" if readme.is_dir() else "does not exist"
        parser.error(f"--readme {readme} {kind}; give the Markdown file with <!-- {label} -->")
    if args.gallery and not (readme and args.gallery.is_dir()):
        parser.error(f"--gallery {args.gallery} needs --readme and must be a folder of pictures")
    notes: list[str] = []
    try:
        runs = load_runs(args.paths, notes)
        extra = [c for c in args.columns.split(",") if c]
        if not runs.empty and (unknown := ", ".join(c for c in extra if c not in runs)):
            known = ", ".join(sorted(set(runs) - {"point"}))
            parser.error(f"--columns: unknown {unknown} (in no summary read); known: {known}")
        text = table(runs, extra, args.present)
        content = fill(readme, label, text, args.gallery) if readme else None
        print("".join(f"note: {note}\n" for note in notes), end="", file=sys.stderr)
        print(text)
        if folder := args.collect:  # every summary as <name>.json, an unfinished run's as read
            folder.mkdir(parents=True, exist_ok=True)
            for path in find_summaries(args.paths):
                target = folder / f"{(summary := read_summary(path))['name']}.json"
                if path.name == "args.json":
                    target.write_text(json.dumps(summary, indent=2) + "\n")
                elif not (target.exists() and target.samefile(path)):  # a folder into itself
                    shutil.copyfile(path, target)
        if content is not None:
            readme.write_text(content)
        return 0
    except SummaryError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except OSError as exc:  # writing --collect or --readme; what is read is a SummaryError
        print(f"error: {exc.filename}: cannot be written ({exc.strerror})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
