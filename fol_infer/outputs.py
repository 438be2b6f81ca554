"""Query results in the formats the next tool reads: hloc retrieval pairs, CSV, JSON.

- pairs (hloc's ``pairs_from_retrieval`` format): one ``query_name db_name`` line per pair,
  a query's pairs in the final order (re-ranked, else global), top-k of each query. hloc
  names images relative to an image folder and splits each line on whitespace, so database
  names are the index's names (relative to the database root) and query names are relative
  to the query folder they were found in (the file name for a file given directly); a name
  with whitespace is refused, naming it.
- CSV: one row per (query, rank) of the final order, with the database image's index name,
  its absolute file, its global score (when in the global top-k) and its match count.
- JSON (`QueryResult.to_json`): every hit has ``path`` (the index's name) and ``file``
  (absolute: opens from any working directory); each result records ``database_root``.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

from fol_infer.errors import UsageError
from fol_infer.pipeline import QueryResult

CSV_COLUMNS = ("query", "rank", "path", "file", "db_index", "global_score", "matches")


def query_names(files: Sequence[Path], given: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Each query's name for the pairs file: relative to the folder argument that holds it,
    else its file name (a file given directly)."""
    folders = [Path(os.path.abspath(g)) for g in given if Path(g).is_dir()]
    names = []
    for f in files:
        holder = next((d for d in folders if f.is_relative_to(d)), None)
        names.append(f.relative_to(holder).as_posix() if holder else f.name)
    return names


def pairs_text(results: Sequence[QueryResult], names: Sequence[str]) -> str:
    """hloc pairs, one line per (query, database image), final order; see module doc."""
    lines = []
    for result, name in zip(results, names, strict=True):
        hits = result.reranked if result.reranked is not None else result.global_hits
        for hit in hits:
            for side in (name, hit.path):
                if not side or any(c.isspace() for c in side):
                    raise UsageError(
                        f"cannot write hloc pairs: {side!r} contains whitespace, which hloc "
                        "reads as a separator; rename the image or use --csv / --json"
                    )
            lines.append(f"{name} {hit.path}")
    return "\n".join(lines) + ("\n" if lines else "")


def csv_text(results: Sequence[QueryResult]) -> str:
    """One row per (query, rank) of the final order; see `CSV_COLUMNS` and the module doc."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for result in results:
        scores = {h.db_index: f"{h.score:.6f}" for h in result.global_hits}
        rows: list[tuple[int, int, str, str, str]]
        if result.reranked is None:
            rows = [
                (h.rank, h.db_index, h.path, scores[h.db_index], "") for h in result.global_hits
            ]
        else:
            rows = [
                (h.rank, h.db_index, h.path, scores.get(h.db_index, ""), str(h.matches))
                for h in result.reranked
            ]
        for rank, db_index, path, score, matches in rows:
            writer.writerow(
                (result.query, rank, path, result.file_of(path), db_index, score, matches)
            )
    return out.getvalue()


def text_bytes(text: str) -> bytes:
    """UTF-8, with undecodable file-name bytes written back as they are on disk."""
    return text.encode("utf-8", "surrogateescape")
