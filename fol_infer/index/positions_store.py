"""The positions an index was given (``index --positions FILE``), kept beside its metadata.

``positions.json`` maps image names (as the index names them) to coordinates of one kind.
It is optional and derived: written after a build or append completes, read by `show` and
anyone who wants green/red frames; an image it does not list falls back to its file name's
UTM coordinates (`fol_infer.positions`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fol_infer.errors import IndexStoreError
from fol_infer.index.metadata import read_json, write_json_atomic
from fol_infer.positions import (
    PositionKind,
    Positions,
    PositionTable,
    coordinate_problem,
    positions_of,
)

POSITIONS_FILE = "positions.json"
_FORMAT = "fol-infer-index-positions"


def save_positions(index_dir: Path, names: Sequence[str], positions: Positions) -> None:
    """Record ``positions`` (row i for ``names[i]``) atomically; unknown rows are left out."""
    rows = {
        name: [float(c[0]), float(c[1])]
        for name, c, known in zip(names, positions.coords, positions.known)
        if known
    }
    obj = {"format": _FORMAT, "kind": positions.kind.value, "positions": rows}
    write_json_atomic(index_dir / POSITIONS_FILE, obj, "saving positions to")


def load_positions(
    index_dir: Path, names: Sequence[str], absolute: Sequence[Path]
) -> tuple[Positions | None, list[str]]:
    """Each image's position (recorded, else its name's UTM) and the names without one."""
    path = index_dir / POSITIONS_FILE
    if not path.is_file():
        found, _ = positions_of(absolute)
        known = found.known if found is not None else np.zeros(len(names), bool)
        return found, [n for n, k in zip(names, known) if not k]
    rows, kind = _read_record(path)
    nan = (np.nan, np.nan)
    coords = np.array([rows.get(n, nan) for n in names], np.float64).reshape(-1, 2)
    if kind is PositionKind.UTM:  # names fill in what the file does not list
        fill, _ = positions_of(absolute)
        if fill is not None:
            gaps = ~np.isfinite(coords).all(axis=1)
            coords[gaps] = fill.coords[gaps]
    positions = Positions(kind, coords)
    missing = [n for n, k in zip(names, positions.known) if not k]
    return (None if len(missing) == len(names) else positions), missing


def _read_record(path: Path) -> tuple[dict[str, tuple[float, float]], PositionKind]:
    """Every recorded position, each checked as a CSV row is (finite, lat/lon in range): a
    hand-edited or damaged file is named with the entry and what is wrong with it."""
    obj = read_json(path, "positions record")

    def damaged(why: str) -> IndexStoreError:
        repair = "rerun `fol-infer index ... --append --positions FILE`"
        return IndexStoreError(f"{path} is damaged: {why}; {repair}")

    if obj.get("format") != _FORMAT:
        raise damaged("not a positions record (format)")
    try:
        kind = PositionKind(obj.get("kind"))
    except (TypeError, ValueError):
        raise damaged(f"kind {obj.get('kind')!r} is not one of {PositionKind.listed()}") from None
    entries = obj.get("positions")
    if not isinstance(entries, dict):
        raise damaged("positions is not an object")
    rows = {}
    for name, value in entries.items():
        values = value if isinstance(value, list) else [value]
        why = coordinate_problem(kind, values)
        if why is not None:
            raise damaged(f"positions[{name!r}] {why}")
        rows[name] = (float(values[0]), float(values[1]))
    return rows, kind


def record_positions(
    index_dir: Path, names: Sequence[str], absolute: Sequence[Path], table: PositionTable
) -> list[str]:
    """Record the CSV's positions for every indexed image (earlier records of the same kind
    kept for images the CSV does not list); return the names still without a position."""
    found, _ = positions_of(absolute, table)
    coords = found.coords if found is not None else np.full((len(names), 2), np.nan)
    before, _ = load_positions(index_dir, names, absolute)
    if before is not None and before.kind is table.kind:
        gaps = ~np.isfinite(coords).all(axis=1)
        coords[gaps] = before.coords[gaps]
    positions = Positions(table.kind, coords)
    save_positions(index_dir, names, positions)
    return [n for n, k in zip(names, positions.known) if not k]
