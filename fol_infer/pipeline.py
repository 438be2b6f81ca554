"""The query API: open a bundle and an index once, then `query(images) -> results`.

encode (global branch) -> FAISS search -> encode (local branch) -> token fetch -> re-rank.
The local branch runs only when re-ranking is asked for. Every stage is timed, so that the
benchmark reads its latency breakdown from the same code users run. Safe to call from
several threads: onnxruntime sessions, FAISS CPU search and token-store reads are all
thread-safe, and no call mutates shared state.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fol_infer.backends import open_encoder
from fol_infer.backends.base import Encoder
from fol_infer.bundle import Bundle
from fol_infer.choices import EncoderBackend, FaissDevice, RerankBackend
from fol_infer.errors import UsageError
from fol_infer.images import ImageSource, preprocess, source_name
from fol_infer.rerank import RerankSettings, rerank_order
from fol_infer.shard_set import LocalShardSet, ShardSet

log = logging.getLogger(__name__)
STAGES = ("preprocess", "global", "search", "local", "fetch", "rerank")


@dataclass
class GlobalHit:
    rank: int
    db_index: int
    path: str
    score: float


@dataclass
class RerankHit:
    rank: int
    db_index: int
    path: str
    matches: int


@dataclass
class QueryResult:
    query: str
    global_hits: list[GlobalHit]
    reranked: list[RerankHit] | None
    timings_ms: dict[str, float] = field(default_factory=dict)  # this query's share per stage
    descriptor: np.ndarray | None = field(default=None, repr=False)  # (8448,) global descriptor
    threshold: float | None = None  # the re-ranking threshold the matches were counted at
    database_root: str = ""  # absolute; hit paths are relative to it (or absolute themselves)
    missing_shards: list[str] = field(default_factory=list)  # allow_partial: shards not heard

    @property
    def partial(self) -> bool:
        return bool(self.missing_shards)

    def file_of(self, path: str) -> str:
        """The absolute file of a hit's path: opens from any working directory."""
        return os.path.join(self.database_root, path)

    def to_json(self) -> dict[str, Any]:
        """The documented JSON shape of `fol-infer query --json`: each hit's ``path`` is the
        index's name for the image, ``file`` its absolute path; ``partial`` and
        ``missing_shards`` only when shards of a map did not answer (``allow_partial``)."""

        def hits(found: Sequence[GlobalHit] | Sequence[RerankHit] | None) -> list[dict[str, Any]]:
            return [vars(h) | {"file": self.file_of(h.path)} for h in found or []]

        doc: dict[str, Any] = {
            "query": self.query,
            "database_root": self.database_root,
            "global": hits(self.global_hits),
            "reranked": hits(self.reranked),
            "threshold": self.threshold,
        }
        if self.partial:
            doc |= {"partial": True, "missing_shards": self.missing_shards}
        return doc

    def ranking(self) -> list[int]:
        """Final order of database ids: re-ranked ones first, then the rest of the global list."""
        if self.reranked is None:
            return [h.db_index for h in self.global_hits]
        head = [h.db_index for h in self.reranked]
        seen = set(head)
        return head + [h.db_index for h in self.global_hits if h.db_index not in seen]


def open_shard_set(
    folder: str | Path,
    bundle: Bundle | None = None,
    ray: str | None = None,
    device: FaissDevice = "auto",
    timeout_s: float = 30.0,
    **ray_options: Any,
) -> ShardSet:
    """An index or a map, for queries: every shard opened in this process, or, with `ray`
    (``"auto"`` or a head's ``HOST:PORT``), one Ray actor per shard behind a compiled graph
    (needs ``fol-infer[ray]``; `RayShardSet`'s settings and Ray actor options go through
    `ray_options`). Here, above both kinds, so that neither imports the other."""
    if ray is None:
        return LocalShardSet(Path(folder), bundle, device)
    from fol_infer.distributed.serve import RayShardSet

    return RayShardSet(Path(folder), bundle, ray, timeout_s, **ray_options)


class Timer:
    def __init__(self) -> None:
        self.ms: dict[str, float] = dict.fromkeys(STAGES, 0.0)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] += (time.perf_counter() - start) * 1e3


class Retriever:
    """Bundle + index (or map) + re-ranker, opened once; `close()` (or `with`) releases them."""

    def __init__(
        self,
        bundle: str | Path | Bundle,
        index: str | Path | ShardSet,
        backend: EncoderBackend | str = EncoderBackend.ONNX,
        rerank: RerankSettings | None = None,
        checkpoint: str | Path | None = None,
        threads: int | None = None,
        encoder: Encoder | None = None,
        allow_partial: bool = False,
    ) -> None:
        """``index``: an index or map folder (opened here), or a `ShardSet` (e.g.
        ``open_shard_set(folder, ray="auto")``, closed with the retriever). ``rerank``:
        threshold, backend, CPU block and workers [`RerankSettings()`]. ``encoder``: an
        encoder of this bundle already open (e.g. the one that built the index), used instead
        of opening another; the caller keeps it and closes it. ``allow_partial``: answer from
        the shards that answer and list the others in each result, instead of raising."""
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        if isinstance(index, ShardSet):
            self.shards = index
            index.manifest.check_bundle(self.bundle.manifest.fingerprint, str(self.bundle.folder))
        else:
            self.shards = open_shard_set(index, self.bundle)
        self.allow_partial = allow_partial
        rerank = rerank or RerankSettings()
        try:
            rerank.check_tokens(self.shards.token_format, str(index))
        except UsageError:
            self.shards.close()
            raise
        if rerank.backend in (RerankBackend.ONNX, RerankBackend.TRT):  # refuse an old bundle now
            try:
                self.bundle.rerank_graph()
            except BaseException:
                self.shards.close()
                raise
        self._owns_encoder = encoder is None
        try:
            self.encoder = encoder or open_encoder(
                self.bundle, backend, checkpoint=checkpoint, threads=threads
            )
        except BaseException:
            self.shards.close()
            raise
        self.rerank = rerank
        self._root = os.path.abspath(self.shards.manifest.root)
        self._clamped: set[tuple[str, int, int]] = set()  # depths already said to be clamped

    def query(
        self,
        images: ImageSource | Sequence[ImageSource],
        top_k: int = 10,
        rerank_k: int = 100,
        rerank: bool = True,
    ) -> list[QueryResult]:
        """Answer a batch of queries (paths, PIL images or uint8 arrays).

        `top_k` is the length of each returned list; `rerank_k` candidates of the global
        search are re-ranked. Both are clamped to the database size (with a notice).
        """
        if self.closed:
            raise UsageError("this Retriever is closed: open a new one to query again")
        if isinstance(images, (str, Path, np.ndarray)) or not isinstance(images, Sequence):
            images = [images]
        if not images:
            return []
        n = len(self.shards)
        top_k, rerank_k = (
            self._clamp(top_k, "top_k", n),
            self._clamp(rerank_k, "rerank_k", n, rerank),
        )
        timer = Timer()
        with timer.stage("preprocess"):
            batch = np.stack([preprocess(img, self.bundle.resolution) for img in images])
        with timer.stage("global"):
            global_out = self.encoder.encode_global(batch)
        depth = max(top_k, rerank_k) if rerank else top_k
        with timer.stage("search"):
            scores, ids, missing = self.shards.search(
                global_out.descriptors, depth, self.allow_partial
            )
        matches: list[np.ndarray] = []
        candidates: list[np.ndarray] = []
        if rerank:
            with timer.stage("local"):
                query_tokens = self.encoder.encode_local(global_out)
            candidates = [row[:rerank_k][row[:rerank_k] >= 0] for row in ids]
            queries = [t[:c] for t, c in zip(query_tokens.tokens, query_tokens.counts)]
            matches, lost = self.shards.score(
                queries, candidates, self.rerank, timer, self.allow_partial
            )
            missing = sorted(set(missing) | set(lost))
        share = {k: v / len(images) for k, v in timer.ms.items()}
        results = []
        for q, source in enumerate(images):
            hits = [
                GlobalHit(r + 1, int(i), self.shards.paths[int(i)], float(s))
                for r, (i, s) in enumerate(zip(ids[q][:top_k], scores[q][:top_k]))
                if i >= 0
            ]
            reranked = None
            if rerank:
                heard = matches[q] >= 0  # a shard lost between search and scoring: not ranked
                cand, counts = candidates[q][heard], matches[q][heard]
                order = rerank_order(counts)[:top_k]
                reranked = [
                    RerankHit(r + 1, int(cand[j]), self.shards.paths[int(cand[j])], int(counts[j]))
                    for r, j in enumerate(order)
                ]
            descriptor = global_out.descriptors[q]
            threshold = self.rerank.threshold if rerank else None
            name = source_name(source, q)
            results.append(
                QueryResult(
                    name, hits, reranked, share, descriptor, threshold, self._root, list(missing)
                )
            )
        return results

    def _clamp(self, k: int, name: str, n: int, used: bool = True) -> int:
        """`k` within the database size; said once per setting (a query loop would repeat
        it), and not for a depth this query does not use (``rerank_k`` without re-ranking)."""
        if k < 1:
            raise UsageError(f"{name} must be at least 1, got {k}")
        if k > n and used and (name, k, n) not in self._clamped:
            self._clamped.add((name, k, n))
            log.warning("%s = %d is larger than the database (%d images): using %d", name, k, n, n)
        return min(k, n)

    closed = False

    def close(self) -> None:
        """Release the index and the encoder it opened; later queries are refused. Safe to
        call twice."""
        if self.closed:
            return
        self.closed = True
        if self._owns_encoder:
            self.encoder.close()
        self.shards.close()

    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
