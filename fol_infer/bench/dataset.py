"""Evaluation datasets in the standard VPR layout (spec section 8), opened for a benchmark.

The layout the usual downloaders write (Pitts30k, Tokyo24/7, ...)::

    <root>/images/test/database/**/@<utm_east>@<utm_north>@...jpg
    <root>/images/test/queries/**/@<utm_east>@<utm_north>@...jpg

Some downloaders stop a level lower (the MSLS formatter writes ``msls/val/{database,queries}``
and links ``msls/test`` to it), so `open_dataset` also accepts a root holding ``test/database``
and ``test/queries``, or ``database/`` and ``queries/`` directly. Images are found with
`fol_infer.images.find_images` (every image extension, hidden files skipped, sorted by path)
and their positions read from a CSV or their file names (`fol_infer.positions`); images
without one do not stop a run: the dataset opens and says why recall cannot be computed.
A dataset drawn by `fol_infer.bench.synthetic` is recognised as such (`Dataset.synthetic`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fol_infer.bench.synthetic import is_synthetic
from fol_infer.errors import UsageError
from fol_infer.images import find_images
from fol_infer.positions import (
    RADIUS_M,
    Positions,
    PositionTable,
    missing_note,
    positions_of,
    positives,
)

# Where database/ and queries/ may sit under the root, most standard first.
_PREFIXES: tuple[tuple[str, ...], ...] = (("images", "test"), ("test",), ())
LAYOUT_TREE = """\
<root>/
  images/
    test/
      database/   @<utm_east>@<utm_north>@....jpg  (reference images)
      queries/    @<utm_east>@<utm_north>@....jpg  (query images)"""


@dataclass(frozen=True)
class DatasetLayout:
    """Where one dataset's two image folders are; `root` is the folder the user named."""

    root: Path
    database_dir: Path
    queries_dir: Path

    @classmethod
    def find(cls, root: Path | str) -> DatasetLayout:
        """Resolve the folders, or raise `UsageError` naming the missing one and the layout."""
        root = Path(root)
        if not root.is_dir():
            raise UsageError(f"dataset root {root}: no such folder. Expected:\n{LAYOUT_TREE}")
        for prefix in _PREFIXES:
            base = root.joinpath(*prefix)
            if (base / "database").is_dir() and (base / "queries").is_dir():
                return cls(root, base / "database", base / "queries")
        raise UsageError(f"{_missing(root)} in dataset root {root}. Expected:\n{LAYOUT_TREE}")


def _missing(root: Path) -> str:
    """Name the first absent folder, in the partial layout the user seems to have."""
    for prefix in _PREFIXES:
        base = root.joinpath(*prefix)
        has_db, has_queries = ((base / name).is_dir() for name in ("database", "queries"))
        if has_db or has_queries:
            return f"no folder {'/'.join((*prefix, 'queries' if has_db else 'database'))}/"
    path: tuple[str, ...] = ()
    for part in (*_PREFIXES[0], "database"):
        path = (*path, part)
        if not root.joinpath(*path).is_dir():
            break
    return f"no folder {'/'.join(path)}/"


@dataclass(frozen=True)
class Dataset:
    """Database and query images, sorted, and their positions (file names or a CSV).

    `positions_unavailable` is None when every image has a position; otherwise it says why
    recall cannot be computed (how many images lack one, and which) and both position sets
    are None. `synthetic` marks `make_dataset` output.
    """

    layout: DatasetLayout
    database: list[Path]
    queries: list[Path]
    database_positions: Positions | None
    query_positions: Positions | None
    positions_unavailable: str | None
    synthetic: bool

    def positives(self, radius: float = RADIUS_M) -> list[np.ndarray] | None:
        """Database indices within `radius` metres of each query; None without positions."""
        if self.database_positions is None or self.query_positions is None:
            return None
        return positives(self.database_positions, self.query_positions, radius)


def open_dataset(root: Path | str, table: PositionTable | None = None) -> Dataset:
    """Open a dataset in the standard layout (see module doc); `UsageError` when unusable.

    Positions come from `table` (a CSV, see `fol_infer.positions`) and else from file names.
    """
    layout = DatasetLayout.find(root)
    database = _images(layout.database_dir)
    queries = _images(layout.queries_dir)
    db_positions, db_why = _positions(database, "database", table)
    q_positions, q_why = _positions(queries, "query", table)
    why = db_why or q_why
    return Dataset(
        layout=layout,
        database=database,
        queries=queries,
        database_positions=None if why else db_positions,
        query_positions=None if why else q_positions,
        positions_unavailable=why,
        synthetic=any(is_synthetic(d) for d in _readme_folders(layout)),
    )


def _images(folder: Path) -> list[Path]:
    found = find_images([folder])
    if not found:
        raise UsageError(f"{folder} holds no images: put the dataset's .jpg files there")
    return found


def _positions(
    paths: list[Path], what: str, table: PositionTable | None
) -> tuple[Positions | None, str | None]:
    """Every image's position, or None and a reason naming how many lack one, and which."""
    found, missing = positions_of(paths, table)
    if not missing:
        return found, None
    if table is None:
        return None, (
            f"{len(missing)} of {len(paths)} {what} file names carry no UTM coordinates "
            f"(e.g. {Path(missing[0]).name}; expected @<utm_east>@<utm_north>@..., or give "
            "--positions FILE), so there is no ground truth and recall is unavailable"
        )
    return None, (
        f"{missing_note(missing, len(paths), what)} (in {table.source} or their names), "
        "so there is no ground truth and recall is unavailable"
    )


def _readme_folders(layout: DatasetLayout) -> list[Path]:
    """The folder holding database/ and its two parents: `make_dataset`'s README is at
    ``<root>/README.txt`` beside ``images/test``, even when the user names ``images/test``."""
    base = layout.database_dir.parent
    return [base, base.parent, base.parent.parent]
