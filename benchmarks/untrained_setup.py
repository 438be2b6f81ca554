"""What the end-to-end benchmarks share: an UNTRAINED seeded bundle and a synthetic dataset.

Imported by the scripts beside it (run as `python benchmarks/NAME.py`, so this folder is on
the path).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

from fol_infer.bench.environment import cpu_model
from fol_infer.bench.synthetic import make_dataset
from fol_infer.bundle import Bundle
from fol_infer.export.onnx import export_bundle
from fol_infer.model.checkpoint import make_checkpoint


def machine() -> str:
    return f"{platform.node()}: {cpu_model()}"


def write_report(path: Path | None, report: dict) -> None:  # type: ignore[type-arg]
    """Save `report` as JSON to `path` (if given), with the machine, the command line and the
    load average as the run ends (other work on the machine shows there)."""
    if path is not None:
        full: dict[str, object] = {"machine": machine(), "command": " ".join(["python", *sys.argv])}
        full |= {"load_average_1_5_15_min": os.getloadavg()} | report
        path.write_text(json.dumps(full, indent=2) + "\n")
        print(f"wrote {path}")


def untrained_setup(
    work: Path, arch: str, resolution: int, places: int, distractors: int, queries: int
) -> tuple[Bundle, Path, list[Path]]:
    """(bundle, database folder, the first `queries` query images), all made under `work`."""
    ckpt = make_checkpoint(arch, 0, work / "ckpt.pth")
    bundle = Bundle.open(export_bundle(ckpt, work / "bundle", resolution))
    data = make_dataset(work / "data", places=places, queries_per_place=1, distractors=distractors)
    test = data / "images" / "test"
    return bundle, test / "database", sorted((test / "queries").glob("*.jpg"))[:queries]
