"""What every benchmark script shares: its command line's base and the one shape of its report.

Imported by the scripts beside it (run as `python benchmarks/NAME.py`, so this folder is on
the path). Each script builds its command line in `options()` from `parser(__doc__)` and saves
its figures with `write_report`, so every JSON result names its machine the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

from fol_infer.bench.environment import cpu_model, gpu_model, versions


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser described by the script's docstring (usage lines kept as written), with
    `--json PATH` already there."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    return p


def settings(args: argparse.Namespace) -> dict[str, object]:
    """The options a run measured with (not where its report went)."""
    return {k: v for k, v in vars(args).items() if k != "json"}


def machine() -> dict[str, object]:
    """Where the figures were measured: only figures of the same machine compare."""
    return {
        "host": platform.node(),
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),  # the ones this run could use
        "gpu": gpu_model(),
        "python": platform.python_version(),
        "libraries": versions(),
    }


def write_report(path: Path | None, report: dict[str, Any]) -> None:
    """Save `report` as JSON to `path` (if given), after the machine, the command line and the
    load average as the run ends (other work on the machine shows there)."""
    if path is None:
        return
    full: dict[str, Any] = {"machine": machine(), "command": shlex.join(["python", *sys.argv])}
    full |= {"load_average_1_5_15_min": os.getloadavg()} | report
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(full, indent=2, default=str) + "\n")
    print(f"wrote {path}")
