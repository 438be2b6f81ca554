"""What the end-to-end benchmarks start from: an UNTRAINED seeded bundle and a synthetic dataset.

Imported by the scripts beside it (run as `python benchmarks/NAME.py`, so this folder is on
the path).
"""

from __future__ import annotations

from pathlib import Path

from fol_infer.bench.synthetic import make_dataset
from fol_infer.bundle import Bundle
from fol_infer.export.onnx import export_bundle
from fol_infer.model.checkpoint import make_checkpoint


def untrained_setup(
    work: Path, arch: str, resolution: int, places: int, distractors: int, queries: int
) -> tuple[Bundle, Path, list[Path]]:
    """(bundle, database folder, the first `queries` query images), all made under `work`."""
    ckpt = make_checkpoint(arch, 0, work / "ckpt.pth")
    bundle = Bundle.open(export_bundle(ckpt, work / "bundle", resolution))
    data = make_dataset(work / "data", places=places, queries_per_place=1, distractors=distractors)
    test = data / "images" / "test"
    return bundle, test / "database", sorted((test / "queries").glob("*.jpg"))[:queries]
