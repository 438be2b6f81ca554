"""Where images were taken: from ``@<utm_east>@<utm_north>@`` file names or from a CSV file.

The one home for image positions, their distances and the ground truth built on them:

- names: ``@0543256.96@4178906.29@...jpg`` (spec section 8; UTM metres, Euclidean distance);
- a CSV with a header ``path,easting,northing`` (metres, Euclidean distance, the same UTM
  zone throughout) or ``path,lat,lon`` (degrees, great-circle distance on a sphere of the
  Earth's mean radius). Relative paths in the CSV are relative to the CSV's own folder, so one
  file beside a dataset can hold both its ``database/...`` and ``queries/...`` images.

A position from the CSV wins over one in the name; with a lat/lon CSV, names are not read
(a mix of degrees and metres has no distance). A database image is a positive for a query
when it lies within the radius (25 m by default, as the VPR benchmarks), boundary included.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from fol_infer.choices import Choice
from fol_infer.errors import UsageError
from fol_infer.files.names import quoted

RADIUS_M = 25.0
EARTH_RADIUS_M = 6_371_008.8  # IUGG mean radius
MAX_REPORTED_ROWS = 20  # bad CSV rows named in one error; the count says how many more


class PositionKind(Choice):
    """What a position's two numbers are, and so which distance applies. Read from a CSV's
    header, never typed by users: it lives here, beside the positions it describes."""

    UTM = "utm"  # easting, northing in metres: Euclidean distance
    LATLON = "latlon"  # latitude, longitude in degrees: great-circle distance

    @property
    def columns(self) -> tuple[str, str]:
        """The CSV columns that hold them, after ``path``."""
        return ("easting", "northing") if self is PositionKind.UTM else ("lat", "lon")


def parse_utm(path: str | os.PathLike[str]) -> tuple[float, float] | None:
    """(east, north) from a name like ``@0543256.96@4178906.29@...``, or None without them."""
    parts = Path(path).name.split("@")
    if len(parts) < 3:
        return None
    try:
        east, north = float(parts[1]), float(parts[2])
    except ValueError:
        return None
    if not (math.isfinite(east) and math.isfinite(north)):
        return None
    return east, north


@dataclass(frozen=True)
class Positions:
    """One position per image, in image order: ``coords`` (N, 2) float64, NaN where unknown."""

    kind: PositionKind
    coords: np.ndarray

    @property
    def known(self) -> np.ndarray:
        """(N,) bool: which images have a position."""
        return np.isfinite(self.coords).all(axis=1)

    def distances_m(self, point: Sequence[float] | np.ndarray) -> np.ndarray:
        """Metres from ``point`` (same kind) to every image; NaN where a position is unknown."""
        return distances_m(self.kind, self.coords, np.asarray(point, np.float64))


def distances_m(kind: PositionKind, coords: np.ndarray, point: np.ndarray) -> np.ndarray:
    """Metres from ``point`` to each row of ``coords``: Euclidean (UTM) or haversine (lat/lon)."""
    if kind is PositionKind.UTM:
        return np.hypot(coords[:, 0] - point[0], coords[:, 1] - point[1])
    lat1, lon1 = np.radians(coords[:, 0]), np.radians(coords[:, 1])
    lat2, lon2 = math.radians(point[0]), math.radians(point[1])
    a = (
        np.sin((lat1 - lat2) / 2) ** 2
        + np.cos(lat1) * math.cos(lat2) * np.sin((lon1 - lon2) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def positives(
    database: np.ndarray | Positions,
    queries: np.ndarray | Positions,
    radius: float = RADIUS_M,
) -> list[np.ndarray]:
    """Per query, the sorted int64 indices of database images at most ``radius`` metres away.

    Plain (N, 2) arrays are UTM. UTM: the database is sorted by easting once and each query
    checks only the band of easting within the radius, so memory stays O(database). Lat/lon:
    a great-circle distance to every database image per query. Unknown positions (NaN) are
    never positives; a query without a position has none.
    """
    db, qs = _as_positions(database, "database"), _as_positions(queries, "queries")
    if db.kind is not qs.kind:
        raise UsageError(
            f"database positions are {db.kind.value} but query positions are "
            f"{qs.kind.value}: give both in the same kind"
        )
    check_radius(radius)
    if db.kind is PositionKind.LATLON:
        out = []
        for point in qs.coords:
            d = db.distances_m(point)
            out.append(np.flatnonzero(d <= radius).astype(np.int64))
        return out
    known = np.flatnonzero(db.known)
    order = known[np.argsort(db.coords[known, 0], kind="stable")]
    east = db.coords[order, 0]
    lo = np.searchsorted(east, qs.coords[:, 0] - radius, side="left")
    hi = np.searchsorted(east, qs.coords[:, 0] + radius, side="right")
    out = []
    for (qe, qn), a, b in zip(qs.coords, lo, hi, strict=True):
        band = order[a:b]
        distance = np.hypot(db.coords[band, 0] - qe, db.coords[band, 1] - qn)
        out.append(np.sort(band[distance <= radius]).astype(np.int64))
    return out


def check_radius(radius: float) -> float:
    """`radius` when it is a distance a positive can lie within: finite and above 0 m (NaN
    would make every result wrong, 0 keeps only an exact position)."""
    if not (isinstance(radius, (int, float, np.floating)) and math.isfinite(radius) and radius > 0):
        raise UsageError(f"the positive radius must be a finite distance > 0 m, got {radius}")
    return float(radius)


def _as_positions(value: np.ndarray | Positions, name: str) -> Positions:
    if isinstance(value, Positions):
        return value
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} positions must be (N, 2) east/north, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} positions have NaN or infinite coordinates")
    return Positions(PositionKind.UTM, arr)


# ---------------------------------------------------------------- a CSV of positions


@dataclass(frozen=True)
class PositionTable:
    """A CSV's positions, keyed by the absolute, normalised path of each image, with the line
    each row starts on (to name rows that match no image)."""

    source: Path
    kind: PositionKind
    by_path: dict[str, tuple[float, float]] = field(repr=False)
    lines: dict[str, int] = field(default_factory=dict, repr=False)

    def get(self, path: str | os.PathLike[str]) -> tuple[float, float] | None:
        return self.by_path.get(_key(path))

    def unmatched_note(self, paths: Sequence[str | os.PathLike[str]], limit: int = 5) -> str | None:
        """'2 of 9 rows of pos.csv match no image: line 4 (x.jpg), line 7 (y.jpg)', naming the
        first few rows no path in `paths` has, or None when every row is used."""
        used = {_key(p) for p in paths}
        unused = sorted((line, key) for key, line in self.lines.items() if key not in used)
        if not unused:
            return None
        named = ", ".join(f"line {line} ({quoted(Path(key).name)})" for line, key in unused[:limit])
        more = f" and {len(unused) - limit} more" if len(unused) > limit else ""
        return (
            f"{len(unused)} of {len(self.by_path)} rows of {self.source} match no image: "
            f"{named}{more}"
        )


def _key(path: str | os.PathLike[str], base: Path | None = None) -> str:
    p = Path(path).expanduser()
    if not p.is_absolute() and base is not None:
        p = base / p
    return os.path.normpath(os.path.abspath(p))


def read_positions_csv(path: str | os.PathLike[str]) -> PositionTable:
    """Read ``path,easting,northing`` or ``path,lat,lon`` rows (extra columns are ignored).

    The file is parsed as RFC 4180 CSV (a quoted name may hold commas or newlines), and every
    bad row is named by the line it starts on and its reason (missing value, duplicate path,
    non-numeric or out-of-range coordinate) in one `UsageError`, so a file is fixed in one go.
    """
    source = Path(path)
    try:
        with open(source, encoding="utf-8-sig", newline="") as f:
            rows = _numbered_rows(f, source)
    except FileNotFoundError:
        raise UsageError(f"positions file not found: {source}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read positions file {source}: {exc}") from None
    header = [h.strip().lower() for h in rows[0][1]] if rows else []
    kind = _kind_of(header, source)
    columns = [header.index(name) for name in ("path", *kind.columns)]
    base = source.resolve().parent
    by_path: dict[str, tuple[float, float]] = {}
    first_line: dict[str, int] = {}
    problems: list[str] = []
    for line, row in rows[1:]:
        if not any(cell.strip() for cell in row):
            continue  # blank lines are not rows
        why, key, value = _parse_row(row, columns, kind, base)
        if why is None and key in first_line:
            why = f"duplicate path {row[columns[0]].strip()!r} (first on line {first_line[key]})"
        if why is not None:
            problems.append(f"line {line}: {why}")
            continue
        assert key is not None and value is not None
        by_path[key], first_line[key] = value, line
    if problems:
        shown = problems[:MAX_REPORTED_ROWS]
        more = len(problems) - len(shown)
        tail = f"; and {more} more bad rows" if more else ""
        raise UsageError(f"{source}: {len(problems)} bad rows: " + "; ".join(shown) + tail)
    if not by_path:
        raise UsageError(f"{source} lists no positions (a header and no rows)")
    return PositionTable(source, kind, by_path, first_line)


def _numbered_rows(f: TextIO, source: Path) -> list[tuple[int, list[str]]]:
    """Every row of the open file with the line it starts on (a quoted field may span lines)."""
    reader = csv.reader(f, strict=True)  # a stray quote is an error, not a merged row
    rows = []
    start = 1
    try:
        for row in reader:
            rows.append((start, row))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise UsageError(f"{source}: line {start}: {exc}") from None
    return rows


def _kind_of(header: list[str], source: Path) -> PositionKind:
    for kind in PositionKind:
        if "path" in header and all(c in header for c in kind.columns):
            return kind
    raise UsageError(
        f"{source}: the header must name the columns path,easting,northing (UTM metres) or "
        f"path,lat,lon (degrees); it has {','.join(header) or 'nothing'}"
    )


def _parse_row(
    row: list[str], columns: list[int], kind: PositionKind, base: Path
) -> tuple[str | None, str | None, tuple[float, float] | None]:
    """(reason it is bad, None, None) or (None, path key, coordinates)."""
    names = ("path", *kind.columns)
    cells = [row[i].strip() if i < len(row) else "" for i in columns]
    for name, cell in zip(names, cells):
        if not cell:
            return f"missing {name}", None, None
    values: list[float] = []
    for name, cell in zip(names[1:], cells[1:]):
        try:
            value = float(cell)
        except ValueError:
            return f"{name} {cell!r} is not a number", None, None
        values.append(value)
    why = coordinate_problem(kind, values, [repr(c) for c in cells[1:]])
    if why is not None:
        return why, None, None
    return None, _key(cells[0], base), (values[0], values[1])


def coordinate_problem(
    kind: PositionKind, values: Sequence[object], shown: Sequence[str] | None = None
) -> str | None:
    """Why two values read from a file are not a position of `kind` ('lat 91.0 is outside
    [-90, 90]', 'easting 'inf' is not a finite number'), or None. `shown`: how to quote each
    value (default: as read)."""
    shown = shown or [repr(v) for v in values]
    if len(values) != 2:
        return f"is not a pair of numbers ({', '.join(kind.columns)})"
    numbers = []
    for name, value, text in zip(kind.columns, values, shown):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{name} {text} is not a number"
        if not math.isfinite(value):
            return f"{name} {text} is not a finite number"
        numbers.append(float(value))
    if kind is PositionKind.LATLON:
        lat, lon = numbers
        if not -90 <= lat <= 90:
            return f"lat {lat} is outside [-90, 90]"
        if not -180 <= lon <= 180:
            return f"lon {lon} is outside [-180, 180]"
    return None


def positions_of(
    paths: Sequence[str | os.PathLike[str]], table: PositionTable | None = None
) -> tuple[Positions | None, list[str]]:
    """Positions of ``paths`` (from ``table``, else their names) and the paths without one.

    None when no image has a position at all (and then every path is listed).
    """
    kind = table.kind if table is not None else PositionKind.UTM
    coords = np.full((len(paths), 2), np.nan)
    for i, p in enumerate(paths):
        found = table.get(p) if table is not None else None
        if found is None and kind is PositionKind.UTM:
            found = parse_utm(p)
        if found is not None:
            coords[i] = found
    result = Positions(kind, coords)
    missing = [str(p) for p, k in zip(paths, result.known) if not k]
    return (None if len(missing) == len(paths) else result), missing


def missing_note(missing: Sequence[str], total: int, what: str, limit: int = 5) -> str:
    """'2 of 17 database images have no position: a.jpg, b.jpg' (the first few named)."""
    names = ", ".join(Path(p).name for p in missing[:limit])
    more = f" and {len(missing) - limit} more" if len(missing) > limit else ""
    return f"{len(missing)} of {total} {what} images have no position: {names}{more}"
