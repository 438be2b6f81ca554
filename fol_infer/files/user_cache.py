"""The user's cache folder: ``$FOL_INFER_CACHE``, else ``~/.cache/fol-infer``.

Generated defaults (bench checkpoints, bundles, datasets) and the record of verified files
(`fol_infer.files.integrity`) live here, never inside a bundle or an index: those may be read-only.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("FOL_INFER_CACHE") or Path.home() / ".cache" / "fol-infer"
    return Path(root)
