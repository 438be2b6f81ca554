"""`show results`: each query with its global and re-ranked top-K, framed by correctness.

A result is green when it lies within the positive radius of the query, red when it lies
beyond it, grey when either position is unknown (then a note says why: the figure never
guesses).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fol_infer.pipeline import QueryResult
from fol_infer.positions import Positions, check_radius, missing_note
from fol_infer.viz.figure import GREEN, GREY, RED, new_figure, save, untrained_caption

THUMB = 256  # pixels, longest side of each tile
LABEL_CHARS = 24  # longer names (UTM-coded ones) are shortened in the middle to fit a tile


def short_name(path: str) -> str:
    name = Path(path).name
    if len(name) <= LABEL_CHARS:
        return name
    keep = (LABEL_CHARS - 1) // 2
    return f"{name[:keep]}\u2026{name[-keep:]}"


@dataclass(frozen=True)
class Tile:
    file: str  # absolute: the image drawn
    label: str  # rank and name, score or match count
    correct: bool | None  # within the radius of the query; None when unknown

    @property
    def frame(self) -> str:
        return GREY if self.correct is None else GREEN if self.correct else RED


@dataclass(frozen=True)
class ResultRow:
    query: str
    global_tiles: list[Tile]
    reranked_tiles: list[Tile] | None


@dataclass(frozen=True)
class ResultsFigure:
    rows: list[ResultRow]
    radius_m: float
    notes: list[str]  # why frames are plain, which images have no position


def results_figure(
    results: Sequence[QueryResult],
    database: Positions | None,
    queries: Positions | None,
    radius_m: float,
    database_missing: Sequence[str] = (),
) -> ResultsFigure:
    """Tiles for each query: global top-K (score) and re-ranked top-K (matches)."""
    check_radius(radius_m)
    notes = []
    if database is None:
        notes.append(
            "the index has no positions (no @east@north@ file names, no index --positions): "
            "plain frames"
        )
    elif database_missing:
        notes.append(missing_note(database_missing, len(database.coords), "database"))
    if database is not None and queries is None:
        notes.append("the queries have no positions (give --positions FILE): plain frames")
    elif queries is not None and not queries.known.all():
        lacking = [r.query for r, k in zip(results, queries.known) if not k]
        notes.append(missing_note(lacking, len(results), "query"))

    rows = []
    for q, result in enumerate(results):
        distance = None
        if database is not None and queries is not None and queries.known[q]:
            distance = database.distances_m(queries.coords[q])

        def correct(db_index: int, d: np.ndarray | None = distance) -> bool | None:
            if d is None or not np.isfinite(d[db_index]):
                return None
            return bool(d[db_index] <= radius_m)

        global_tiles = [
            Tile(result.file_of(h.path), f"{h.rank}. {short_name(h.path)}\n{h.score:.3f}",
                 correct(h.db_index))
            for h in result.global_hits
        ]  # fmt: skip
        reranked = None
        if result.reranked is not None:
            reranked = [
                Tile(result.file_of(h.path), f"{h.rank}. {short_name(h.path)}\n{h.matches} matches",
                     correct(h.db_index))
                for h in result.reranked
            ]  # fmt: skip
        rows.append(ResultRow(result.query, global_tiles, reranked))
    return ResultsFigure(rows, radius_m, notes)


def _thumbnail(file: str) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(file) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    image.thumbnail((THUMB, THUMB))
    return np.asarray(image)


def draw_results(data: ResultsFigure, out: Path, trained: bool) -> None:
    k = max(len(r.global_tiles) for r in data.rows)
    lines = [
        line
        for r in data.rows
        for line in (
            (r.query, "global (score)", r.global_tiles),
            *([(r.query, "re-ranked (matches)", r.reranked_tiles)] if r.reranked_tiles else []),
        )
    ]
    figure = new_figure(figsize=(2.1 * (k + 1), 2.3 * len(lines) + 0.6 * (1 + len(data.notes))))
    from matplotlib.patches import Rectangle

    grid = figure.subplots(len(lines), k + 1, squeeze=False)
    for row, (query, kind, tiles) in zip(grid, lines):
        for ax in row:
            ax.set_axis_off()
        if kind.startswith("global"):
            row[0].imshow(_thumbnail(query))
            row[0].set_title(f"query\n{short_name(query)}", fontsize=8)
        row[1].text(-0.08, 0.5, kind, rotation=90, va="center", ha="right",
                    transform=row[1].transAxes, fontsize=8)  # fmt: skip
        for ax, tile in zip(row[1:], tiles):
            ax.imshow(_thumbnail(tile.file))
            ax.set_title(tile.label, fontsize=7)
            ax.add_patch(
                Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, lw=4, ec=tile.frame)
            )
    framed = any(t.correct is not None for r in data.rows for t in r.global_tiles)
    title = (
        f"top {k}: green within {data.radius_m:g} m of the query, red beyond, grey unknown"
        if framed
        else f"top {k} (positions unknown: plain frames)"
    )
    figure.suptitle(title + "".join(f"\nnote: {n}" for n in data.notes), fontsize=10)
    untrained_caption(figure, trained)
    save(figure, out)
