"""The README's drop-in snippets, run exactly as printed on a tiny model and a few batches."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import torch
import torch.nn as nn
from conftest import REPO, subprocess_env, write_tiny_mnist

import config
import main
from models import build_model


def snippet(name: str) -> str:
    """The python block between <!-- snippet: name --> and <!-- /snippet --> in README.md."""
    text = (REPO / "README.md").read_text()
    match = re.search(
        rf"<!-- snippet: {name} -->\n```python\n(.*?)```\n<!-- /snippet -->", text, re.S
    )
    assert match, f"README.md has no snippet {name}"
    return match.group(1)


def test_standalone_snippet_lowers_the_intra_term() -> None:
    torch.manual_seed(0)
    g, labels = torch.Generator().manual_seed(0), torch.arange(16) % 4
    images = torch.randn(4, 8, generator=g)[labels] + 0.3 * torch.randn(16, 8, generator=g)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    scope = dict(num_classes=4, feat_dim=2, model=model, batches=[(images, labels)])
    exec(snippet("standalone-sgd"), scope)
    first_intra, _ = scope["criterion"].terms(model(images), labels)
    first_loss = scope["criterion"](model(images), labels)
    scope["batches"] *= 30
    exec(snippet("standalone-sgd"), scope)  # 30 more steps (the snippet builds fresh optimisers)
    intra, _ = scope["criterion"].terms(model(images), labels)
    assert intra < 0.5 * first_intra and scope["loss"] < first_loss


def test_paper_snippet_moves_the_centers_by_eq_4() -> None:
    """After one step, each center is c - alpha * sum_i [y_i = j](c - x_i) / (1 + n_j), with the
    step's features (from the model before the step), computed here by a loop."""
    torch.manual_seed(0)
    model = build_model("lenet++", 1, 3, 2, 28)  # (features, logits) as the snippet wants
    batches = [(torch.rand(16, 1, 28, 28), torch.arange(16) % 3)]
    features = model(batches[0][0])[0].detach()
    centers = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(1)  # CenterLoss draws the same centers
    # what the text says the reader brings
    scope = {"num_classes": 3, "feat_dim": 2, "model": model, "batches": batches}
    exec(snippet("cent-paper"), scope)
    labels = batches[0][1]
    for j in range(3):
        members = features[labels == j]
        expected = centers[j] - 0.5 * (centers[j] - members).sum(0) / (1 + len(members))
        torch.testing.assert_close(scope["center_loss"].centers[j], expected)


def doc_commands() -> str:
    """The shell blocks of README.md, then of docs/*.md by name, as written (a fence labelled shell, or one whose
    first line runs python or a loop), but device_check.sh's (a device call) and ../shared/seed's (not in a clone)."""
    blocks = [
        body
        for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
        for lang, body in re.findall(r"```(\w*)\n(.*?)```", path.read_text(), re.S)
        if lang == "shell" or re.match(r"(for|python) ", body)
    ]
    lines = "".join(blocks).splitlines()
    return "\n".join(x for x in lines if "device_check.sh" not in x and "shared/seed" not in x)


def test_doc_commands_run_in_order_in_a_fresh_clone(tmp_path, monkeypatch):
    """Every command of README.md and docs/, in order, through bash from a clone beside ../shared/data (the tests' tiny
    MNIST), each program a stub that records its arguments: every main.py command (alone, through torchrun or
    reproduce.sh) passes main.py's checks and meets no run folder of an earlier command with other settings (the CPU
    torchrun line met the first run's finished folder); every script named is in the repository. The torchrun line then
    runs for real, at tiny settings."""
    clone, stubs, log = tmp_path / "clone", tmp_path / "stubs", tmp_path / "calls"
    stubs.mkdir(parents=True)
    write_tiny_mnist(tmp_path / "shared" / "data")
    shutil.copytree(REPO, clone, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "results"))
    for name in ("python", "python3", "torchrun", "pip", "git", "grid"):  # grid: reproduce.sh's
        record = f"printf '%s\\037' {name} \"$@\" >> {log}\necho >> {log}\n"
        venv = '[ "$2" = venv ] && mkdir -p "$3/bin" && : > "$3/bin/activate"\n'  # -m venv .venv
        (stubs / name).write_text(f"#!/bin/sh\n{record}{venv}true\n")
        (stubs / name).chmod(0o755)
    env = {**subprocess_env(), "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "PYTHON": "grid"}
    env.pop("DATA_DIR", None)
    options = dict(cwd=clone, env=env, capture_output=True, text=True, timeout=60)
    proc = subprocess.run(["bash", "-c", doc_commands()], **options)
    assert proc.stderr == ""
    calls = [line.split("\037")[:-1] for line in log.read_text().splitlines()]
    monkeypatch.chdir(clone)
    folders: dict[Path, dict] = {}
    for program, *argv in calls:
        argv = argv[argv.index("main.py") :] if program == "torchrun" else argv
        if program in ("python", "torchrun", "grid") and argv[0] != "-m":
            assert (REPO / argv[0]).is_file(), argv
        if argv[0] == "main.py" and "..." not in argv:
            argv = ["../shared/data" if a == "DIR" else a for a in argv]
            args = vars(config.parse_args(argv[1:]))
            folder = Path(args["out"], args["name"])
            # reproduce.sh skips a finished run of the same settings; main.py refuses any finished run
            met = folders.setdefault(folder, args) is not args
            assert not met or (program == "grid" and folders[folder] == args), argv
    assert len(folders) > 20
    for text in (path.read_text() for path in [REPO / "README.md", *(REPO / "docs").glob("*.md")]):
        assert "shared/seed/run-study-code.sh" not in text or "not part of a clone" in text
    # The first run, `python main.py`, runs in test_first_run.py; the CPU torchrun line, as one
    # process, runs here for real at tiny settings.
    assert next(c for c in calls if c[0] == "python") == ["python", "main.py"]
    cpu = next(c for c in calls if c[0] == "torchrun" and "cpu" in c)
    tiny = ["--epochs", "1", "--train-samples", "64", "--batch-size", "32", "--no-plots"]
    assert main.main([*cpu[cpu.index("main.py") + 1 :], *tiny]) == 0
