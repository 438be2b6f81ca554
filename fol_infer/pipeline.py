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
from fol_infer.choices import EncoderBackend, RerankBackend
from fol_infer.errors import UsageError
from fol_infer.images import ImageSource, preprocess, source_name
from fol_infer.index.database import Database
from fol_infer.rerank import (
    RerankSettings,
    count_mutual_matches_certified,
    rerank_order,
    score_many,
)

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

    def file_of(self, path: str) -> str:
        """The absolute file of a hit's path: opens from any working directory."""
        return os.path.join(self.database_root, path)

    def to_json(self) -> dict[str, Any]:
        """The documented JSON shape of `fol-infer query --json`: each hit's ``path`` is the
        index's name for the image, ``file`` its absolute path."""

        def hits(found: Sequence[GlobalHit] | Sequence[RerankHit] | None) -> list[dict[str, Any]]:
            return [vars(h) | {"file": self.file_of(h.path)} for h in found or []]

        return {
            "query": self.query,
            "database_root": self.database_root,
            "global": hits(self.global_hits),
            "reranked": hits(self.reranked),
            "threshold": self.threshold,
        }

    def ranking(self) -> list[int]:
        """Final order of database ids: re-ranked ones first, then the rest of the global list."""
        if self.reranked is None:
            return [h.db_index for h in self.global_hits]
        head = [h.db_index for h in self.reranked]
        seen = set(head)
        return head + [h.db_index for h in self.global_hits if h.db_index not in seen]


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
    """Bundle + index + re-ranker, opened once; `close()` (or `with`) releases them."""

    def __init__(
        self,
        bundle: str | Path | Bundle,
        index: str | Path,
        backend: EncoderBackend | str = EncoderBackend.ONNX,
        rerank: RerankSettings | None = None,
        checkpoint: str | Path | None = None,
        threads: int | None = None,
        encoder: Encoder | None = None,
    ) -> None:
        """``rerank``: threshold, backend, CPU block and workers [`RerankSettings()`].
        ``encoder``: an encoder of this bundle already open (e.g. the one that built the
        index), used instead of opening another; the caller keeps it and closes it."""
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        self.database = Database(index, bundle=self.bundle)
        rerank = rerank or RerankSettings()
        try:
            rerank.check_tokens(self.database.token_format, str(index))
        except UsageError:
            self.database.close()
            raise
        if rerank.backend in (RerankBackend.ONNX, RerankBackend.TRT):  # refuse an old bundle now
            try:
                self.bundle.rerank_graph()
            except BaseException:
                self.database.close()
                raise
        self._owns_encoder = encoder is None
        try:
            self.encoder = encoder or open_encoder(
                self.bundle, backend, checkpoint=checkpoint, threads=threads
            )
        except BaseException:
            self.database.close()
            raise
        self.rerank = rerank
        self._root = os.path.abspath(self.database.meta.root)

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
        if isinstance(images, (str, Path, np.ndarray)) or not isinstance(images, Sequence):
            images = [images]  # type: ignore[list-item]
        if not images:
            return []
        n = len(self.database)
        top_k, rerank_k = self._clamp(top_k, "top_k", n), self._clamp(rerank_k, "rerank_k", n)
        timer = Timer()
        with timer.stage("preprocess"):
            batch = np.stack([preprocess(img, self.bundle.resolution) for img in images])
        with timer.stage("global"):
            global_out = self.encoder.encode_global(batch)
        depth = max(top_k, rerank_k) if rerank else top_k
        with timer.stage("search"):
            scores, ids = self.database.global_index.search(global_out.descriptors, depth)
        matches: list[np.ndarray] = []
        candidates: list[np.ndarray] = []
        if rerank:
            with timer.stage("local"):
                query_tokens = self.encoder.encode_local(global_out)
            candidates = [row[:rerank_k][row[:rerank_k] >= 0] for row in ids]
            queries = [t[:c] for t, c in zip(query_tokens.tokens, query_tokens.counts)]
            matches = self._rerank(queries, candidates, timer)
        share = {k: v / len(images) for k, v in timer.ms.items()}
        results = []
        for q, source in enumerate(images):
            hits = [
                GlobalHit(r + 1, int(i), self.database.paths[int(i)], float(s))
                for r, (i, s) in enumerate(zip(ids[q][:top_k], scores[q][:top_k]))
                if i >= 0
            ]
            reranked = None
            if rerank:
                cand = candidates[q]
                order = rerank_order(matches[q])[:top_k]
                reranked = [
                    RerankHit(
                        r + 1, int(cand[j]), self.database.paths[int(cand[j])], int(matches[q][j])
                    )
                    for r, j in enumerate(order)
                ]
            descriptor = global_out.descriptors[q]
            threshold = self.rerank.threshold if rerank else None
            name = source_name(source, q)
            results.append(
                QueryResult(name, hits, reranked, share, descriptor, threshold, self._root)
            )
        return results

    def _rerank(
        self, queries: list[np.ndarray], candidates: list[np.ndarray], timer: Timer
    ) -> list[np.ndarray]:
        """Match counts of each query's candidates. An int8-exact index is scored from its int8
        tokens, reading float32 rows only where the int8 error bound leaves a decision open
        (those reads count as re-ranking time)."""
        store, exact = self.database.tokens, self.database.exact_tokens
        with timer.stage("fetch"):
            wanted = np.unique(np.concatenate(candidates))
            tokens = store.get_quantized(wanted) if exact is not None else store.get(wanted)
            fetched: dict[int, Any] = dict(zip(wanted.tolist(), tokens))
        with timer.stage("rerank"):
            lists = [[fetched[int(i)] for i in cand] for cand in candidates]
            if exact is None:
                return score_many(queries, lists, self.rerank, self.bundle)

            def originals(q: int, k: int, rows: np.ndarray) -> np.ndarray:
                return exact.get_rows(int(candidates[q][k]), rows)

            s = self.rerank
            certified = count_mutual_matches_certified(
                queries, lists, originals, s.threshold, block_bytes=s.block_bytes, workers=s.workers
            )
            return [c.scores for c in certified]

    @staticmethod
    def _clamp(k: int, name: str, n: int) -> int:
        if k < 1:
            raise UsageError(f"{name} must be at least 1, got {k}")
        if k > n:
            log.warning("%s = %d is larger than the database (%d images): using %d", name, k, n, n)
        return min(k, n)

    def close(self) -> None:
        if self._owns_encoder:
            self.encoder.close()
        self.database.close()

    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
