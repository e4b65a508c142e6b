"""report.py (the study's table beside ours) and reproduce.sh (the sweep that skips finished runs)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import listing
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import report  # noqa: E402


def write_summary(folder: Path, loss: str, dataset: str, feat_dim: int, acc: float, **extra) -> None:
    name = f"{loss}-{dataset}-feat={feat_dim}"
    summary = {
        "name": name,
        "loss": loss,
        "dataset": dataset,
        "feat_dim": feat_dim,
        "acc": acc,
        "lr": 0.01,
        "epochs": 3,
        "batch_size": 128,
        "weight_cent": 1.0,
        "weight_intra": 1.0,
        "weight_inter": 0.1,
        "ncm_acc": acc - 0.01,
        **extra,
    }
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
    study = report.study_rows()
    assert [(r[0], r[1], r[2]) for r in rows] == [(s["loss"], s["dataset"], s["feat_dim"]) for s in study]
    by_key = {(r[0], r[1], int(r[2])): r for r in rows}
    standalone = by_key[("standalone", "mnist", 2)]
    # loss dataset feat acc lr epochs batch w_cent w_intra w_inter study diff ncm best
    assert standalone[3:] == ["0.981", "0.01", "3", "128", "/", "1.0", "0.1", "0.994", "-0.013", "0.971", "/"]
    cent = by_key[("cent", "cifar10", 128)]
    assert cent[3] == "0.700" and cent[7] == "1.0" and cent[8:10] == ["/", "/"]
    assert cent[10:] == ["0.858", "-0.158", "0.690", "0.750"]
    missing = by_key[("xent", "fashion-mnist", 2)]
    assert missing[3] == "missing" and missing[10] == "0.913" and missing[11] == "/"
    assert sum(r[3] == "missing" for r in rows) == 16


def test_collect_and_readme_markers(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_summary(runs, "xent", "mnist", 2, 0.95)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- table:cpu -->\nold\n<!-- /table:cpu -->\nend\n")
    assert report.main([str(runs), "--collect", str(tmp_path / "results"), "--readme", str(readme), "--label", "cpu"]) == 0
    assert json.loads((tmp_path / "results" / "xent-mnist-feat=2.json").read_text())["acc"] == 0.95
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("end\n")
    assert "| xent | mnist | 2 | 0.950 |" in text
    # The collected files alone give the same table.
    assert report.table(report.load_runs([tmp_path / "results"]), ["ncm_acc"]) == report.table(report.load_runs([runs]), ["ncm_acc"])


def test_readme_without_markers_is_an_error(tmp_path: Path, capsys) -> None:
    write_summary(tmp_path / "runs", "xent", "mnist", 2, 0.95)
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    assert report.main([str(tmp_path / "runs"), "--readme", str(readme), "--label", "x"]) == 1
    assert "markers" in capsys.readouterr().err
    assert readme.read_text() == "no markers\n"


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
def test_bad_summary_is_one_line_naming_the_file(tmp_path: Path, capsys, content: str, message: str) -> None:
    """A malformed, non-object or incomplete summary.json: exit 1, one line naming the file, nothing
    written (not even the --collect folder)."""
    write_summary(tmp_path / "runs", "standalone", "mnist", 2, 0.98)
    bad = tmp_path / "runs" / "xent-mnist-feat=2" / "summary.json"
    bad.parent.mkdir()
    if content.startswith("SUMMARY|"):
        key, value = content.removeprefix("SUMMARY|").split("=", 1)
        write_summary(tmp_path / "elsewhere", "xent", "mnist", 2, 0.9)
        summary = json.loads((tmp_path / "elsewhere" / "xent-mnist-feat=2" / "summary.json").read_text())
        shutil.rmtree(tmp_path / "elsewhere")
        bad.write_text(json.dumps({**summary, key: json.loads(value)}))
    else:
        bad.write_bytes(content.encode("latin-1"))
    before = listing(tmp_path)
    assert report.main([str(tmp_path / "runs"), "--collect", str(tmp_path / "collected")]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"error: {bad}: ") and message in captured.err
    assert listing(tmp_path) == before


@pytest.mark.parametrize("jobs", ["0", "00", "abc", "-1", "2x", "1.5"])
def test_reproduce_refuses_a_bad_jobs_count(tmp_path: Path, jobs: str) -> None:
    """JOBS=0 used to spin forever and JOBS=abc to start every run at once: one line, exit 2, nothing started."""
    env = {**os.environ, "JOBS": jobs, "OUT": str(tmp_path / "runs"), "PYTHON": sys.executable, "LOSSES": "xent", "DATASETS": "mnist"}
    before = listing(tmp_path)
    result = subprocess.run(["bash", "reproduce.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"reproduce.sh: error: JOBS must be a positive integer (runs at once), not '{jobs}'\n"
    assert listing(tmp_path) == before


def write_tree(root: Path, classes: int = 3, per_class: int = 8, size: int = 28) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for k in range(classes):
            folder = root / split / f"c{k}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                image = (rng.random((size, size)) * 60).astype(np.uint8)
                image[:, k * 2 : k * 2 + 2] = 250
                Image.fromarray(image).save(folder / f"{i}.png")


def test_reproduce_runs_each_grid_point_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_tree(data, classes=10, per_class=3)  # --dataset mnist must be 28x28 grey of 10 classes
    out = tmp_path / "runs"
    env = {
        **os.environ,
        "DATA_DIR": str(data),
        "EPOCHS": "1",
        "OUT": str(out),
        "JOBS": "2",
        "PYTHON": sys.executable,
        "LOSSES": "xent standalone",
        "DATASETS": "mnist cifar10",
        "FEAT_DIMS": "2",
    }
    extra = ["--batch-size", "8", "--no-plots", "--model", "lenet++"]
    first = subprocess.run(["bash", "reproduce.sh", *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    names = {"xent-mnist-feat=2", "standalone-mnist-feat=2", "xent-cifar10-feat=2", "standalone-cifar10-feat=2"}
    assert {p.parent.name for p in out.glob("*/summary.json")} == names
    for name in names:
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["epochs"] == 1 and summary["batch_size"] == 8 and summary["model"] == "lenet++"
    stamps = {name: (out / name / "summary.json").stat().st_mtime_ns for name in names}
    second = subprocess.run(["bash", "reproduce.sh", *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0
    assert second.stdout.count("skip ") == 4 and "start " not in second.stdout
    assert stamps == {name: (out / name / "summary.json").stat().st_mtime_ns for name in names}


def test_reproduce_reports_failed_runs(tmp_path: Path) -> None:
    env = {**os.environ, "DATA_DIR": str(tmp_path / "nowhere"), "EPOCHS": "1", "OUT": str(tmp_path / "runs"), "PYTHON": sys.executable}
    env.update(LOSSES="xent", DATASETS="mnist", FEAT_DIMS="2")
    result = subprocess.run(["bash", "reproduce.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "FAILED xent-mnist-feat=2" in result.stdout and "1 run(s) failed" in result.stdout


def test_readme_table_matches_committed_results() -> None:
    """README's cpu-3ep table is exactly what report.py makes of results/cpu-3ep: all 18 grid points
    measured, 3-epoch float32 runs with clean_train_acc, and imgs/ holds each row's pictures (the
    GIFs of the 2-D rows, the projections of the 128-D rows)."""
    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- table:cpu-3ep -->\n", "<!-- /table:cpu-3ep -->"
    in_readme = readme[readme.index(start) + len(start) : readme.index(end)].strip()
    runs = report.load_runs([ROOT / "results" / "cpu-3ep"])
    assert in_readme == report.table(runs, ["ncm_acc", "clean_train_acc", "gap", "knn1_acc", "map_at_r"]).strip()
    rows = table_rows(in_readme)
    assert len(rows) == 18 and not any("missing" in r for r in rows)
    for (loss, dataset, feat_dim), summary in runs.items():
        assert summary["epochs"] == 3 and summary["amp"] == "off" and 0 < summary["clean_train_acc"] <= 1
        names = ("train.gif", "test.gif") if feat_dim == 2 else ("train.png", "test.png")
        for name in names:
            assert (ROOT / "imgs" / f"{loss}-{dataset}-feat={feat_dim}" / name).stat().st_size > 0


def test_gallery_links_resolve_from_the_page_that_holds_them(tmp_path: Path) -> None:
    """--gallery writes links relative to the --readme file's folder: from docs/results.md every
    picture is reached through ../imgs, from a top-level README through imgs; folders without both
    pictures are left out."""
    runs = tmp_path / "results"
    runs.mkdir()
    (runs / "xent-mnist-feat=2.json").write_text((ROOT / "results" / "cpu-3ep" / "xent-mnist-feat=2.json").read_text())
    imgs = tmp_path / "imgs"
    for name, files in {"a-run": ("train.gif", "test.gif"), "b-run": ("train.png", "test.png"), "half": ("train.gif",)}.items():
        (imgs / name).mkdir(parents=True)
        for file in files:
            (imgs / name / file).write_bytes(b"picture")
    for page in (tmp_path / "docs" / "results.md", tmp_path / "README.md"):
        page.parent.mkdir(exist_ok=True)
        page.write_text("<!-- table:t -->\n<!-- /table:t -->\n<!-- gallery -->\n<!-- /gallery -->\n")
        assert report.main([str(runs), "--readme", str(page), "--label", "t", "--gallery", str(imgs)]) == 0
        links = re.findall(r"!\[\]\(([^)]+)\)", page.read_text())
        assert len(links) == 4 and all((page.parent / link).is_file() for link in links)
        assert all(link.startswith("../imgs/" if page.parent.name == "docs" else "imgs/") for link in links)
        assert "half" not in page.read_text()
