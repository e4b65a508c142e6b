"""The first run a newcomer makes: `python main.py` with its defaults (only fewer epochs here)."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio

import main

ACC_FLOOR = 0.35  # below the lowest of three seeds at 2 epochs (0.494), 3.5 times chance


def test_first_run_defaults_end_line_summary_frames_and_gifs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # in-process: the script's own start is in every subprocess test
    assert main.main(["--epochs", "2"]) == 0
    run_dir = Path("runs", "standalone-digits-feat=2")
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("done: acc ") and lines[-1].endswith(f"-> {run_dir}")
    assert any(line.startswith("next: python main.py --dataset mnist") for line in lines)
    assert f"pictures: {run_dir / 'train.gif'}, {run_dir / 'test.gif'}" in lines

    summary = json.loads((run_dir / "summary.json").read_text())
    keys = "loss dataset model feat_dim epochs batch_size patience train_size test_size".split()
    assert [summary[k] for k in keys] == ["standalone", "digits", "resnet", 2, 2, 64, 3, 1437, 360]
    # At 2 epochs, seeds 0-2: acc 0.494, 0.758, 0.583; clean_train_acc 0.536, 0.771, 0.609
    # (results/first-run/two-epochs.txt).
    assert summary["acc"] >= ACC_FLOOR and summary["clean_train_acc"] >= ACC_FLOOR
    assert f"acc {summary['acc']:.4f}" in lines[-1]

    for split in ("train", "test"):
        frames = sorted((run_dir / "frames" / split).glob("epoch_*.png"))
        assert [f.name for f in frames] == ["epoch_001.png", "epoch_002.png"]
        assert iio.imread(frames[-1]).shape[:2] == (400, 400)
        assert len(iio.imread(run_dir / f"{split}.gif", index=None)) == 2  # one GIF frame per epoch
