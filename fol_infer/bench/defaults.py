"""The embedded default of `fol-infer bench`: an UNTRAINED ViT-B/14 and a synthetic dataset.

Both are generated on first use and cached (``$FOL_INFER_CACHE``, else ``~/.cache/fol-infer``)
so that later runs start at once. A user checkpoint given with ``--checkpoint`` is exported
into the same cache, keyed by its sha256 and the resolution.
"""

from __future__ import annotations

from pathlib import Path

from fol_infer.files.integrity import sha256_file
from fol_infer.files.user_cache import cache_dir
from fol_infer.progress import Progress

DEFAULT_ARCH = "vitb14"
DEFAULT_SEED = 0
# Small enough for the whole default run to take a few minutes on 2 CPU cores.
DEFAULT_PLACES, DEFAULT_QUERIES_PER_PLACE, DEFAULT_DISTRACTORS, DEFAULT_DATA_SEED = 12, 1, 8, 0


def default_checkpoint(say: Progress) -> Path:
    from fol_infer.model.checkpoint import make_checkpoint

    path = cache_dir() / "checkpoints" / f"untrained-{DEFAULT_ARCH}-seed{DEFAULT_SEED}.pth"
    if not path.is_file():
        say(f"generating an UNTRAINED seeded {DEFAULT_ARCH} checkpoint in {path}")
        make_checkpoint(DEFAULT_ARCH, DEFAULT_SEED, path)
    return path


def bundle_for(checkpoint: Path, resolution: str, say: Progress) -> Path:
    """Export `checkpoint` once per (content, resolution) into the cache."""
    from fol_infer.export.onnx import export_bundle
    from fol_infer.images import check_resolution

    h, w = check_resolution(resolution)
    key = f"{sha256_file(checkpoint)[:16]}-{h}x{w}"
    folder = cache_dir() / "bundles" / key
    if not (folder / "manifest.json").is_file():
        say(f"exporting {checkpoint.name} at {h}x{w} to {folder} (once)")
        export_bundle(checkpoint, folder, (h, w), force=folder.exists())
    return folder


def default_dataset(say: Progress) -> Path:
    from fol_infer.bench.synthetic import make_dataset

    name = (
        f"synthetic-{DEFAULT_PLACES}p-{DEFAULT_QUERIES_PER_PLACE}q-{DEFAULT_DISTRACTORS}d-"
        f"seed{DEFAULT_DATA_SEED}"
    )
    folder = cache_dir() / "datasets" / name
    if not folder.is_dir():
        say(f"generating a synthetic dataset in {folder}")
        make_dataset(
            folder,
            DEFAULT_PLACES,
            DEFAULT_QUERIES_PER_PLACE,
            DEFAULT_DISTRACTORS,
            DEFAULT_DATA_SEED,
        )
    return folder
