"""House style, enforced by the suite (so by CI): ruff format and ruff check at line length 100."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_the_code_is_formatted_as_ruff_format_writes_it() -> None:
    result = ruff("format", "--check", "--diff", ".")
    assert result.returncode == 0, "run `ruff format .`:\n" + result.stdout[-3000:] + result.stderr


def test_ruff_check_finds_nothing() -> None:
    result = ruff("check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
