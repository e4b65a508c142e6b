"""House style, enforced by the suite (so by CI): ruff format and ruff check at line length 100."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.parametrize("args", ["format --check --diff .", "check --no-cache ."])
def test_ruff_finds_nothing_to_change(args: str) -> None:
    """`ruff format` would leave every file as it is, and `ruff check` finds nothing."""
    command = [sys.executable, "-m", "ruff", *args.split()]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"ruff {args}:\n{result.stdout[-3000:]}{result.stderr}"
