"""Query results in the formats the next tool reads: hloc retrieval pairs, CSV, JSON.

Every format lists each query's **top-k of the final order** (`QueryResult.ranking`): the
re-ranked head, then the rest of the global list, cut at k (the longer of the two lists). With
``--rerank-k`` below ``--top-k`` the first rerank-k rows carry a match count and the rows after
them do not: their order is the global one, as the re-ranker never saw them.

- pairs (hloc's ``pairs_from_retrieval`` format): one ``query_name db_name`` line per pair.
  hloc names images relative to an image folder and splits each line on whitespace, so
  database names are the index's names (relative to the database root) and query names are
  relative to the query folder they were found in, or, for files given directly, to the folder
  those files have in common (``a/q.jpg b/q.jpg`` -> ``a/q.jpg``, ``b/q.jpg``). Names that
  still collide, contain whitespace or are not valid UTF-8 are refused, naming them. The
  format has no room for a mark, so a partial answer (shards of a map did not answer) goes into
  a pairs file only when the caller allowed partial answers.
- CSV: one row per (query, rank) of the final order, with the database image's index name,
  its absolute file, its global score (when in the global top-k), its match count (when
  re-ranked) and ``missing_shards`` (the shards that did not answer, ``;``-separated; empty
  when the answer is complete).
- JSON (`QueryResult.to_json`): every hit has ``path`` (the index's name) and ``file``
  (absolute: opens from any working directory); each result records ``database_root``, and
  ``partial`` / ``missing_shards`` when shards did not answer.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fol_infer.errors import UsageError
from fol_infer.files.names import printable, quoted
from fol_infer.pipeline import QueryResult

CSV_COLUMNS = (
    "query", "rank", "path", "file", "db_index", "global_score", "matches", "missing_shards"
)  # fmt: skip


@dataclass(frozen=True)
class FinalHit:
    """One place of a query's final order: a match count only where it was re-ranked."""

    rank: int
    db_index: int
    path: str
    score: float | None  # None: not in the global top-k
    matches: int | None  # None: beyond the re-ranked head, or no re-ranking


def final_hits(result: QueryResult) -> list[FinalHit]:
    """Top-k of `result`'s final order (`QueryResult.ranking`); see the module doc."""
    scores = {h.db_index: h.score for h in result.global_hits}
    paths = {h.db_index: h.path for h in result.global_hits}
    counts: dict[int, int] = {}
    for hit in result.reranked or []:
        paths[hit.db_index], counts[hit.db_index] = hit.path, hit.matches
    k = max(len(result.global_hits), len(result.reranked or []))
    return [
        FinalHit(rank, i, paths[i], scores.get(i), counts.get(i))
        for rank, i in enumerate(result.ranking()[:k], start=1)
    ]


def query_names(files: Sequence[Path], given: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Each query's name for the pairs file: relative to the folder argument that holds it,
    else to the common folder of the files given directly. Refuses two files of one name."""
    folders = [Path(os.path.abspath(g)) for g in given if Path(g).is_dir()]
    holders = [next((d for d in folders if f.is_relative_to(d)), None) for f in files]
    direct = [f.parent for f, holder in zip(files, holders) if holder is None]
    common = Path(os.path.commonpath(direct)) if direct else None
    names: list[str] = []
    first: dict[str, Path] = {}
    for f, holder in zip(files, holders):
        name = f.relative_to(holder or common or f.parent).as_posix()
        if name in first:
            raise UsageError(
                f"two queries would both be named {quoted(name)} in the pairs file: "
                f"{printable(str(first[name]))} and {printable(str(f))}; give them from one "
                "folder, or rename one"
            )
        first[name] = f
        names.append(name)
    return names


def check_pairs_name(name: str) -> None:
    """Refuse a name hloc cannot read back from a pairs file: whitespace (its separator), or
    bytes that are not UTF-8 (a file name kept with surrogateescape, `fol_infer.files.names`)."""
    if any(c.isspace() for c in name):
        why = "contains whitespace, which hloc reads as a separator"
    else:
        try:
            name.encode("utf-8")
            return
        except UnicodeEncodeError:
            why = "is not valid UTF-8, which hloc cannot read"
    raise UsageError(
        f"cannot write hloc pairs: {quoted(name)} {why}; rename the image or use --csv / --json"
    )


def pairs_text(
    results: Sequence[QueryResult], names: Sequence[str], allow_partial: bool = False
) -> str:
    """hloc pairs, one line per (query, database image), top-k of the final order; a partial
    answer only with `allow_partial` (the format cannot say so); see the module doc."""
    lines = []
    for result, name in zip(results, names, strict=True):
        if result.partial and not allow_partial:
            raise UsageError(
                f"the answer for {printable(result.query)} is partial (shards "
                f"{', '.join(result.missing_shards)} did not answer), which a pairs file "
                "cannot mark; allow partial answers to write it anyway"
            )
        check_pairs_name(name)
        for hit in final_hits(result):
            check_pairs_name(hit.path)
            lines.append(f"{name} {hit.path}")
    return "\n".join(lines) + ("\n" if lines else "")


def csv_text(results: Sequence[QueryResult]) -> str:
    """One row per (query, rank) of the final order; see `CSV_COLUMNS` and the module doc."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for result in results:
        missing = ";".join(result.missing_shards)
        for h in final_hits(result):
            score = "" if h.score is None else f"{h.score:.6f}"
            matches = "" if h.matches is None else str(h.matches)
            file = result.file_of(h.path)
            writer.writerow(
                (result.query, h.rank, h.path, file, h.db_index, score, matches, missing)
            )
    return out.getvalue()


def text_bytes(text: str) -> bytes:
    """UTF-8, with undecodable file-name bytes written back as they are on disk."""
    return text.encode("utf-8", "surrogateescape")


def partial_warning(results: Sequence[QueryResult]) -> str | None:
    """One line naming the shards that did not answer, or None when every answer is whole."""
    partial = [r for r in results if r.partial]
    if not partial:
        return None
    shards = sorted({s for r in partial for s in r.missing_shards})
    return (
        f"PARTIAL answers for {len(partial)} of {len(results)} queries: shards "
        f"{', '.join(shards)} did not answer, so their images are missing from the results"
    )
