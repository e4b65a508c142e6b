"""report.py: the study's table beside ours, seeds, unfinished runs, --collect, --readme, --gallery and its refusals."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO as ROOT
from conftest import listing, stderr_error_line

import report

SETTINGS = dict(
    lr=0.01, epochs=3, batch_size=128, weight_cent=1.0, weight_intra=1.0, weight_inter=0.1
)


def write_summary(
    folder: Path, loss: str, dataset: str, feat_dim: int, acc: float, name=None, **extra
):
    name = name or f"{loss}-{dataset}-feat={feat_dim}"
    summary = dict(name=name, loss=loss, dataset=dataset, feat_dim=feat_dim, acc=acc, **SETTINGS)
    summary |= {"ncm_acc": acc - 0.01, **extra}
    (folder / name).mkdir(parents=True)
    (folder / name / "summary.json").write_text(json.dumps(summary))


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()[2:]]


def test_table_rows_differences_and_missing(tmp_path: Path, capsys) -> None:
    write_summary(tmp_path, "standalone", "mnist", 2, 0.9812)
    write_summary(tmp_path, "cent", "cifar10", 128, 0.7, best_acc=0.75)
    assert report.main([str(tmp_path), "--columns", "ncm_acc,best_acc"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert len(rows) == 18
    study = [(s["loss"], s["dataset"], str(s["feat_dim"])) for s in report.study_rows()]
    assert [tuple(r[:3]) for r in rows] == study
    by_key = {(r[0], r[1], int(r[2])): r for r in rows}
    standalone = by_key[("standalone", "mnist", 2)]
    # loss dataset feat acc lr epochs batch w_cent w_intra w_inter study diff ncm best
    assert standalone[3:] == "0.981|0.01|3|128|/|1.0|0.1|0.994|-0.013|0.971|/".split("|")
    cent = by_key[("cent", "cifar10", 128)]
    assert cent[3] == "0.700" and cent[7] == "1.0" and cent[8:10] == ["/", "/"]
    assert cent[10:] == ["0.858", "-0.158", "0.690", "0.750"]
    missing = by_key[("xent", "fashion-mnist", 2)]
    assert missing[3] == "missing" and missing[10] == "0.913" and missing[11] == "/"
    assert sum(r[3] == "missing" for r in rows) == 16


def write_unfinished_run(
    folder: Path, loss: str, dataset: str, feat_dim: int, accs: list[float], planned: int = 100
) -> Path:
    """A run stopped after len(accs) epochs: args.json and metrics.csv, no summary.json."""
    run_dir = folder / f"{loss}-{dataset}-feat={feat_dim}"
    run_dir.mkdir(parents=True)
    settings = dict(loss=loss, dataset=dataset, feat_dim=feat_dim, **SETTINGS, seed=0, name=None)
    (run_dir / "args.json").write_text(json.dumps(settings | {"epochs": planned}))
    rows = [f"{e},0.001,0.5,{acc},{acc - 0.01}\n" for e, acc in enumerate(accs, 1)]
    (run_dir / "metrics.csv").write_text("epoch,lr,train_acc,test_acc,ncm_acc\n" + "".join(rows))
    return run_dir


def test_unfinished_run_is_its_last_epoch_marked_and_never_compared(tmp_path: Path, capsys) -> None:
    """A stopped run is a row of its last epoch, marked unfinished, no diff; --collect keeps the mark."""
    runs, collected = tmp_path / "runs", tmp_path / "collected"
    write_summary(runs, "standalone", "mnist", 2, 0.9812)
    write_unfinished_run(runs, "xent", "mnist", 2, [0.9, 0.95, 0.97])
    argv = [str(runs), "--present", "--columns", "ncm_acc", "--collect", str(collected)]
    assert report.main(argv) == 0
    rows = {(r[0], r[1], r[2]): r for r in table_rows(capsys.readouterr().out)}
    xent = rows[("xent", "mnist", "2")]
    # loss dataset feat acc lr epochs batch w_cent w_intra w_inter study diff ncm
    want = "0.970 (unfinished)|0.01|3 of 100 (unfinished)|128|/|/|/|0.991|/|0.960"
    assert xent[3:] == want.split("|")
    assert [rows[("standalone", "mnist", "2")][i] for i in (3, 11)] == ["0.981", "-0.013"]
    kept = json.loads((collected / "xent-mnist-feat=2.json").read_text())
    kept = {k: kept[k] for k in ("unfinished", "epochs", "epochs_planned", "acc", "lr")}
    assert kept == dict(unfinished=True, epochs=3, epochs_planned=100, acc=0.97, lr=0.01)
    assert report.main([str(collected), "--present"]) == 0
    assert "| 0.970 (unfinished) |" in capsys.readouterr().out


def test_an_unfinished_run_is_not_averaged_with_finished_seeds(tmp_path: Path, capsys) -> None:
    """A run stopped after its last planned epoch, before its summary: a row of its own."""
    write_summary(tmp_path / "finished", "xent", "mnist", 2, 0.95, seed=0, epochs=3)
    write_unfinished_run(tmp_path / "stopped", "xent", "mnist", 2, [0.9, 0.93, 0.97], planned=3)
    argv = [str(tmp_path / "finished"), str(tmp_path / "stopped"), "--present", "--columns", ""]
    assert report.main(argv) == 0
    rows = [r[3:6] for r in table_rows(capsys.readouterr().out)]
    assert sorted(rows) == [
        ["0.950", "0.01", "3"],
        ["0.970 (unfinished)", "0.01", "3 of 3 (unfinished)"],
    ]


def test_collect_and_readme_markers(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_summary(runs, "xent", "mnist", 2, 0.95)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- table:cpu -->\nold\n<!-- /table:cpu -->\nend\n")
    argv = ["--collect", str(tmp_path / "results"), "--readme", str(readme), "--label", "cpu"]
    assert report.main([str(runs), *argv]) == 0
    assert json.loads((tmp_path / "results" / "xent-mnist-feat=2.json").read_text())["acc"] == 0.95
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("end\n")
    assert table_rows(text.split("\n", 2)[2])[0][:4] == ["xent", "mnist", "2", "0.950"]
    # The collected files alone give the same table.
    tables = [
        report.table(report.load_runs([f]), ["ncm_acc"]) for f in (tmp_path / "results", runs)
    ]
    assert tables[0] == tables[1]


def test_seeds_of_a_grid_point_are_one_row_with_mean_and_sample_std(tmp_path: Path, capsys) -> None:
    """Seeds are one row: mean ± sample std (ddof 1), n; a column one seed lacks says over how many."""
    for seed, acc in enumerate((0.97, 0.98, 0.995)):
        name = "standalone-mnist-feat=2" + (f"-seed={seed}" if seed else "")
        knn = None if seed == 2 else acc - 0.1 * seed
        write_summary(tmp_path, "standalone", "mnist", 2, acc, name=name, seed=seed, knn1_acc=knn)
    write_summary(tmp_path, "xent", "cifar10", 128, 0.5, seed=0, knn1_acc=0.4)
    assert report.main([str(tmp_path), "--columns", "ncm_acc,knn1_acc"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    header, *_ = captured.out.splitlines()
    header = [c.strip() for c in header.strip("|").split("|")]
    assert header[10:] == ["study acc", "diff", "n", "ncm_acc", "knn1_acc"]
    rows = {(r[0], r[1], r[2]): r for r in table_rows(captured.out)}
    accs = np.array([0.97, 0.98, 0.995])
    mean, std = accs.mean(), accs.std(ddof=1)  # 0.9817, 0.0126
    knn = np.array([0.97, 0.88])
    standalone = rows[("standalone", "mnist", "2")]
    assert standalone[3] == f"{mean:.3f} ± {std:.3f}" == "0.982 ± 0.013"
    assert standalone[4:13] == f"0.01|3|128|/|1.0|0.1|0.994|{mean - 0.994:+.3f}|3".split("|")
    assert standalone[13] == f"{mean - 0.01:.3f} ± {std:.3f}"
    assert standalone[14] == f"{knn.mean():.3f} ± {knn.std(ddof=1):.3f} (n=2)"
    want = "0.500|0.01|3|128|/|/|/|0.866|-0.366|1|0.490|0.400"
    assert rows[("xent", "cifar10", "128")][3:] == want.split("|")
    assert rows[("cent", "mnist", "2")][12] == "missing"
    assert len(table_rows(captured.out)) == 18


def test_same_settings_and_seed_twice_names_both_and_shows_the_last(tmp_path: Path, capsys) -> None:
    """One note names both files and the rule; the row is the one found last; n stays out."""
    write_summary(tmp_path / "a", "cent", "mnist", 2, 0.91, seed=0)
    where = dict(out="elsewhere", device="cuda")  # where it ran: no setting
    write_summary(tmp_path / "b", "cent", "mnist", 2, 0.93, seed=0, **where)
    assert report.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    captured = capsys.readouterr()
    first, last = (tmp_path / d / "cent-mnist-feat=2" / "summary.json" for d in ("a", "b"))
    assert captured.err == (
        f"note: {first}, {last}: same settings, seed 0; shown: the one found last (later path "
        "argument, then later name)\n"
    )
    rows = table_rows(captured.out)
    assert len(rows[0]) == 13  # no n column
    assert [r[3] for r in rows if r[:3] == ["cent", "mnist", "2"]] == ["0.930"]


def test_runs_of_other_settings_are_rows_of_their_own(tmp_path: Path, capsys) -> None:
    """3 and 100 epochs are not seeds of each other: two rows, and a note names the setting."""
    write_summary(tmp_path, "xent", "mnist", 2, 0.95, seed=0)
    write_summary(tmp_path, "xent", "mnist", 2, 0.99, name="long", seed=0, epochs=100)
    assert report.main([str(tmp_path), "--columns", ""]) == 0
    captured = capsys.readouterr()
    assert captured.err == "note: xent mnist feat_dim 2: 2 rows; epochs differ\n"
    rows = [(r[3], r[5]) for r in table_rows(captured.out) if r[:3] == ["xent", "mnist", "2"]]
    assert rows == [("0.990", "100"), ("0.950", "3")]


def test_open_set_runs_are_not_compared_with_the_study(tmp_path: Path, capsys) -> None:
    """A run on some classes only (--train-classes) is another task: no study acc, no diff."""
    write_summary(tmp_path, "xent", "fashion-mnist", 2, 0.90, seed=0, train_classes="0-4")
    assert report.main([str(tmp_path), "--present", "--columns", ""]) == 0
    (row,) = table_rows(capsys.readouterr().out)
    assert row[:4] == ["xent", "fashion-mnist", "2", "0.900"] and row[10:12] == ["/", "/"]


def test_unknown_column_is_named_with_the_known_ones(tmp_path: Path, capsys) -> None:
    """It used to print a column of "/" and exit 0."""
    write_summary(tmp_path, "xent", "mnist", 2, 0.95, knn1_acc=0.9)
    assert exit_code([str(tmp_path), "--columns", "ncm_acc,knn_acc,gap"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    line = stderr_error_line(captured.err)
    assert "--columns: unknown knn_acc (in no summary read); known: " in line
    known = set(line.split("known: ")[1].split(", "))
    assert {"acc", "gap", "knn1_acc", "ncm_acc", "weight_cent"} <= known


def exit_code(argv: list[str]) -> int:
    try:
        return report.main(argv)
    except SystemExit as exc:
        return exc.code


# flag | what the target is (absent, a folder, text, or undecodable bytes) | exit code | message
OUTPUT_REFUSALS = """
--readme | absent | 2 | --readme {p} does not exist; give the Markdown file with
--readme | folder | 2 | --readme {p} is a folder; give the Markdown file
--readme | no markers | 1 | markers <!-- table:x --> ... <!-- /table:x --> not found
--readme | bytes | 1 | --readme {p}: not readable as text (
--collect | keep me | 2 | --collect {p} is a file, not a folder
--gallery | absent | 2 | --gallery {p} needs --readme and must be a folder
"""


@pytest.mark.parametrize("row", OUTPUT_REFUSALS.strip().splitlines())
def test_bad_output_flag_is_one_line_and_writes_nothing(tmp_path, capsys, row):
    """A --readme missing, a folder, without markers or not text, a --collect onto a file (never
    replaced), a --gallery of nothing: one line, nothing written."""
    flag, target_is, code, message = row.split(" | ")
    write_summary(tmp_path / "runs", "xent", "mnist", 2, 0.95)
    target = tmp_path / "target"
    if target_is == "folder":
        target.mkdir()
    elif target_is == "bytes":
        target.write_bytes(b"<!-- table:x -->\xff\xfe<!-- /table:x -->")
    elif target_is != "absent":
        target.write_text(target_is)
    before = listing(tmp_path)
    args = [str(tmp_path / "runs"), flag, str(target), "--label", "x"]
    args += ["--collect", str(tmp_path / "collected")] if flag != "--collect" else []
    assert exit_code(args) == int(code)
    captured = capsys.readouterr()
    assert captured.out == "" and message.format(p=target) in stderr_error_line(captured.err)
    assert listing(tmp_path) == before


def test_collect_into_the_folder_it_reads(tmp_path: Path) -> None:
    """report.py results/x --collect results/x refreshes nothing and ends well (SameFileError before)."""
    write_summary(tmp_path / "runs", "xent", "mnist", 2, 0.95)
    assert report.main([str(tmp_path / "runs"), "--collect", str(tmp_path / "results")]) == 0
    before = listing(tmp_path)
    assert report.main([str(tmp_path / "results"), "--collect", str(tmp_path / "results")]) == 0
    assert listing(tmp_path) == before


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"name": "xent-mnist-feat=2", "loss": ', "not readable as JSON"),
        ("\xff\xfe not text", "not readable as JSON"),
        ('["loss", "acc"]', "a JSON list, not a summary object"),
        ("3", "a JSON int, not a summary object"),
        (
            '{"name": "xent-mnist-feat=2", "loss": "xent", "dataset": "mnist", "feat_dim": 2, "acc": 0.9}',
            "incomplete summary (no lr, epochs",
        ),
        ("{}", "incomplete summary (no name, loss, dataset"),
        ("SUMMARY|acc=null", "incomplete summary (no acc)"),
        ('SUMMARY|acc="0.9"', "acc should be numbers"),
        ('SUMMARY|name="../../escape"', "is not a plain run folder name"),
    ],
)
def test_bad_summary_is_one_line_naming_the_file(
    tmp_path: Path, capsys, content: str, message: str
) -> None:
    """A malformed, non-object or incomplete summary.json: exit 1, one line naming the file, nothing
    written (not even the --collect folder)."""
    write_summary(tmp_path / "runs", "standalone", "mnist", 2, 0.98)
    bad = tmp_path / "runs" / "xent-mnist-feat=2" / "summary.json"
    bad.parent.mkdir()
    if content.startswith("SUMMARY|"):
        key, value = content.removeprefix("SUMMARY|").split("=", 1)
        summary = dict(name="xent-mnist-feat=2", loss="xent", dataset="mnist", feat_dim=2, acc=0.9)
        bad.write_text(json.dumps({**summary, **SETTINGS, key: json.loads(value)}))
    else:
        bad.write_bytes(content.encode("latin-1"))
    before = listing(tmp_path)
    assert report.main([str(tmp_path / "runs"), "--collect", str(tmp_path / "collected")]) == 1
    captured = capsys.readouterr()
    line = stderr_error_line(captured.err)
    assert captured.out == "" and line.startswith(f"error: {bad}: ") and message in line
    assert listing(tmp_path) == before


# Each block of README and docs/ between <!-- LABEL --> markers, and report.py's arguments that write it.
BLOCKS = {
    "table:cpu-3ep": "results/cpu-3ep --columns ncm_acc,clean_train_acc,gap,knn1_acc,map_at_r",
    "table:questions-q1": "results/questions/q1 --present --columns clean_train_acc,gap,open_precision_at_1,open_r_precision,open_map_at_r",
    "table:center-update": "results/center-update --present --columns center_update,center_alpha,ncm_acc,clean_train_acc,map_at_r",
    "gallery": None,  # report.py --gallery imgs
    "table:side-by-side": "results/side-by-side/summarize.py",  # a script's table()
    "table:pipeline-fixes": "results/cpu-3ep-nearest/compare.py",
    "table:questions-q2": "results/questions/q2/table.py",
    "table:first-run-threads": "results/first-run/threads/table.py",
    "table:batch-gradient-ratio": "results/batch-gradient-ratio/table.py",
    "table:public-step": "results/speed/public-step/table.py",
    "table:speed-bench": "results/speed/table.py",
    "table:accuracy-check": "results/accuracy-check/table.py",
    "table:cost": "results/device-plan/table.py:cost_table",
    "table:device-plan": "results/device-plan/table.py:plan_table",
    "table:device-rehearsal": "results/device-rehearsal/table.py",
    "table:many-classes": "results/many-classes-e2e/table.py",
    "table:bench-loss": "results/bench-loss/table.py",
    "table:row-sgd": "results/bench-loss/table.py:row_sgd_table",
}


def block(page: str, label: str) -> str:
    text = (ROOT / page).read_text()
    start, end = f"<!-- {label} -->\n", f"\n<!-- /{label} -->"
    return text[text.index(start) + len(start) : text.index(end)]


def test_generated_blocks_are_what_their_generators_write(capsys) -> None:
    """Every results table in README and docs/ is what report.py (or a script beside its results)
    writes from the committed results/; none is typed by hand."""
    found = set()
    for page in ["README.md", *(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]:
        for label in re.findall(r"<!-- (table:[\w-]+|gallery) -->", (ROOT / page).read_text()):
            if label == "gallery":
                want = report.gallery(ROOT / "imgs", ROOT / page)
            elif ".py" in BLOCKS[label]:  # a script's table(), or path.py:function
                path, _, function = BLOCKS[label].partition(":")
                spec = importlib.util.spec_from_file_location("generator", ROOT / path)
                spec.loader.exec_module(generator := importlib.util.module_from_spec(spec))
                want = getattr(generator, function or "table")()
            else:
                folder, *argv = BLOCKS[label].split()
                assert report.main([str(ROOT / folder), *argv]) == 0
                want = capsys.readouterr().out.rstrip("\n")
            assert block(page, label) == want, (page, label)
            found.add(label)
    assert found == set(BLOCKS)


def test_the_readme_table_is_the_whole_grid_with_its_pictures() -> None:
    """results/cpu-3ep: all 18 grid points, one 3-epoch float32 run each, and each row's pictures."""
    runs = report.load_runs([ROOT / "results" / "cpu-3ep"])
    assert "missing" not in block("README.md", "table:cpu-3ep") and len(runs) == 18
    assert runs["point"].is_unique  # one run a row, one seed
    assert (runs["epochs"] == 3).all() and (runs["amp"] == "off").all()
    assert runs["clean_train_acc"].notna().all()
    for loss, dataset, feat_dim in runs[["loss", "dataset", "feat_dim"]].itertuples(index=False):
        names = ("train.gif", "test.gif") if feat_dim == 2 else ("train.png", "test.png")
        for name in names:
            assert (ROOT / "imgs" / f"{loss}-{dataset}-feat={feat_dim}" / name).stat().st_size > 0


def test_gallery_links_resolve_from_the_page_that_holds_them(tmp_path: Path) -> None:
    """--gallery links are relative to the --readme file's folder; half-pictured runs are left out."""
    runs, imgs = tmp_path / "results", tmp_path / "imgs"
    runs.mkdir()
    shutil.copy(ROOT / "results" / "cpu-3ep" / "xent-mnist-feat=2.json", runs)
    pictures = "a-run/train.gif a-run/test.gif b-run/train.png b-run/test.png half/train.gif"
    for picture in pictures.split():
        (imgs / picture).parent.mkdir(parents=True, exist_ok=True)
        (imgs / picture).write_bytes(b"picture")
    for page in (tmp_path / "docs" / "results.md", tmp_path / "README.md"):
        page.parent.mkdir(exist_ok=True)
        page.write_text(
            "<!-- table:t -->\n<!-- /table:t -->\n<!-- gallery -->\n<!-- /gallery -->\n"
        )
        argv = ["--readme", str(page), "--label", "t", "--gallery", str(imgs)]
        assert report.main([str(runs), *argv]) == 0
        links = re.findall(r"!\[\]\(([^)]+)\)", page.read_text())
        assert len(links) == 4 and all((page.parent / link).is_file() for link in links)
        prefix = "../imgs/" if page.parent.name == "docs" else "imgs/"
        assert all(link.startswith(prefix) for link in links)
        assert "half" not in page.read_text()
