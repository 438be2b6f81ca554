"""May a command replace this folder? Only a folder fol-infer made, never one holding the input.

`--force` replaces a bundle (``export``), an index or a sharded map (``index``). Each is
recognised by its own format markers, never by its name: a bundle by ``manifest.json``
carrying the bundle format (or, for bundles written before the marker existed, the
manifest's own keys); a map by ``map.json`` carrying the map format; an index by
``index.json`` carrying the index-metadata format, or, when that file is damaged,
by its ``descriptors/`` token store's record. An empty folder may be replaced too (nothing is
lost), as may one holding only what a killed fol-infer write left (`fileio.is_leftover`).
Anything else is refused, as is any folder that is, contains, or is inside one of the
command's inputs (database folder, bundle, checkpoint), whatever it holds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from fol_infer.errors import UsageError
from fol_infer.fileio import holds_only_leftovers

Product = Literal["index", "bundle", "map"]
_LEGACY_BUNDLE_KEYS = {"schema_version", "fingerprint", "graphs", "arch", "resolution"}


def _json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _markers(product: Product) -> list[tuple[str, str]]:
    """(file inside the folder, the "format" it must carry), any of which identifies it."""
    if product == "bundle":
        from fol_infer.bundle import FORMAT, MANIFEST

        return [(MANIFEST, FORMAT)]
    if product == "map":
        from fol_infer.index.shards import FORMAT as MAP_FORMAT
        from fol_infer.index.shards import MANIFEST as MAP_MANIFEST

        return [(MAP_MANIFEST, MAP_FORMAT)]
    from fol_infer.index.database import DESCRIPTORS, METADATA
    from fol_infer.index.metadata import FORMAT as INDEX_FORMAT
    from fol_infer.index.token_store import COMMIT
    from fol_infer.index.token_store import FORMAT as STORE_FORMAT

    return [(METADATA, INDEX_FORMAT), (f"{DESCRIPTORS}/{COMMIT}", STORE_FORMAT)]


def is_product(folder: Path, product: Product) -> bool:
    """Whether `folder` is a fol-infer bundle / index, by its format markers."""
    for name, fmt in _markers(product):
        obj = _json(folder / name)
        if obj is None:
            continue
        if obj.get("format") == fmt:
            return True
        if product == "bundle" and "format" not in obj and _LEGACY_BUNDLE_KEYS <= obj.keys():
            return True
    return False


def _marker_file(product: Product) -> str:
    return _markers(product)[0][0]


def check_not_input(folder: Path, inputs: Mapping[str, Path | str]) -> None:
    """Refuse a `folder` that is, contains or is inside one of `inputs` (what -> path)."""
    real = folder.resolve()
    for what, given in inputs.items():
        path = Path(given).resolve()
        if path == real:
            relation = "is"
        elif path.is_relative_to(real):
            relation = "contains"
        elif real.is_relative_to(path):
            relation = "is inside"
        else:
            continue
        raise UsageError(
            f"refusing to replace {folder}: it {relation} the {what} {given}, which this "
            "command reads; choose an --out outside it"
        )


def check_replaceable(folder: Path, product: Product, inputs: Mapping[str, Path | str]) -> None:
    """What `--force` checks before a byte is written; nothing to check when `folder` is new."""
    if not folder.exists() and not folder.is_symlink():
        return
    check_not_input(folder, inputs)
    if not folder.is_dir():
        raise UsageError(
            f"refusing to replace {folder}: it is a file, not a fol-infer {product}; "
            "remove it yourself or choose another --out"
        )
    if not holds_only_leftovers(folder) and not is_product(folder, product):
        raise UsageError(
            f"refusing to replace {folder}: it is not a fol-infer {product} (no "
            f"{_marker_file(product)} of this tool) and --force replaces only a {product} "
            "fol-infer made; move your files elsewhere or choose another --out"
        )


def occupied(folder: Path, product: Product) -> str:
    """What to say when `folder` exists and no `--force` was given: suggest it only where it
    would be accepted."""
    if folder.is_dir() and is_product(folder, product):
        return f"{folder} already holds a {product}: pass --force to replace it"
    return (
        f"{folder} exists and is not a fol-infer {product}: choose another --out "
        f"(--force replaces only a {product} fol-infer made, or an empty folder)"
    )
