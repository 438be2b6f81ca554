"""kill -9 at every commit point of every build command, then the same command again: it
finishes with what an uninterrupted run makes, and leaves nothing half-made (see
`tests/crash_points.py`, which runs each scenario in its own process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("crash_points.py")
SCENARIOS = ["index-new", "index-append", "index-force", "map-new", "map-append", "map-force"]


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL") or not hasattr(os, "fork"), reason="POSIX")
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_kill_9_at_every_commit_then_the_same_command_finishes(
    tiny_bundle: Path, tmp_path: Path, scenario: str
) -> None:
    env = os.environ | {
        "PYTHONPATH": str(SCRIPT.parents[1]),
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tiny_bundle), str(tmp_path), scenario],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["problems"] == [], (report, result.stderr[-3000:])
    assert report["points"] >= 5, report  # every store, batch, FAISS and manifest commit
