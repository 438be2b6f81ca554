"""Style is part of CI: ruff's lint rules and formatting over the whole tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def ruff(*args: str) -> subprocess.CompletedProcess[str]:
    beside = Path(sys.executable).parent / "ruff"  # the environment's own ruff first
    exe = str(beside) if beside.exists() else shutil.which("ruff")
    if exe is None:
        pytest.skip("ruff is not installed (pip install '.[dev]')")
    return subprocess.run([exe, *args], cwd=REPO, capture_output=True, text=True, check=False)


def test_ruff_lint_passes() -> None:
    result = ruff("check", "fol_infer", "tests", "benchmarks")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_applied() -> None:
    result = ruff("format", "--check", "fol_infer", "tests", "benchmarks")
    assert result.returncode == 0, result.stdout + result.stderr
