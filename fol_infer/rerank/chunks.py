"""Candidates in fixed-capacity chunks for the re-rank graph's runners (ONNX Runtime, TensorRT).

The graph takes token sets padded to one capacity, a chunk of candidates at a time; memory is
bounded by the chunk, whatever K. Both runners check their inputs here, pack the chunks here
and pack the next chunk on a helper thread while the runtime computes the current one (numpy
copies and the runtimes release the GIL).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from fol_infer.rerank.cpu import threshold_f32

T = TypeVar("T")
DEFAULT_CHUNK = 8  # candidates per run; memory per chunk is in the README (benchmarks)


@dataclass(frozen=True)
class GraphShape:
    """What the graph accepts: token sets of at most ``capacity`` tokens of width ``dim``."""

    capacity: int
    dim: int
    dtype: np.dtype[Any]  # the candidates' storage type (the query is float32)

    def check_set(self, tokens: np.ndarray, what: str) -> None:
        if tokens.ndim != 2 or tokens.shape[1] != self.dim:
            raise ValueError(
                f"{what} has tokens of shape {tokens.shape}; the re-rank graph takes "
                f"(N, {self.dim}) (tokens of another model?)"
            )
        if tokens.shape[0] > self.capacity:
            raise ValueError(
                f"{what} has {tokens.shape[0]} tokens, above the re-rank graph's capacity of "
                f"{self.capacity}"
            )

    def check_padded(self, tokens: np.ndarray, counts: np.ndarray, what: str) -> np.ndarray:
        """``counts`` as int32 after checking them and the (n, capacity, dim) ``tokens``."""
        if tokens.ndim != 3 or tokens.shape[1:] != (self.capacity, self.dim):
            raise ValueError(
                f"{what} tokens have shape {tokens.shape}; the re-rank graph takes "
                f"(n, {self.capacity}, {self.dim})"
            )
        c = np.asarray(counts)
        if c.shape != (tokens.shape[0],) or not np.issubdtype(c.dtype, np.integer):
            raise ValueError(
                f"{what} counts must be {tokens.shape[0]} integers, got {c.dtype} {c.shape}"
            )
        bad = np.flatnonzero((c < 0) | (c > self.capacity))
        if bad.size:
            raise ValueError(
                f"{what} count [{bad[0]}] = {c[bad[0]]} is outside 0..{self.capacity} (the "
                "re-rank graph's capacity)"
            )
        return c.astype(np.int32)

    def pad(self, tokens: np.ndarray) -> np.ndarray:
        """The query as (capacity, dim) float32; rows past its count are zero."""
        out = np.zeros((self.capacity, self.dim), np.float32)
        out[: len(tokens)] = tokens
        return out


def packed_chunks(
    shape: GraphShape, sets: Sequence[np.ndarray], chunk: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens (n, capacity, dim), counts (n,) int32) for ``chunk`` sets at a time."""
    for start in range(0, len(sets), chunk):
        part = sets[start : start + chunk]
        tokens = np.zeros((len(part), shape.capacity, shape.dim), shape.dtype)
        for k, s in enumerate(part):
            tokens[k, : len(s)] = s
        yield tokens, np.array([len(s) for s in part], np.int32)


def padded_chunks(
    shape: GraphShape, tokens: np.ndarray, counts: np.ndarray, chunk: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Slices of already padded sets, converted to the graph's dtype one chunk at a time."""
    for start in range(0, len(tokens), chunk):
        part = np.ascontiguousarray(tokens[start : start + chunk], shape.dtype)
        yield part, counts[start : start + chunk]


def prefetched(items: Iterator[T]) -> Iterator[T]:
    """``items``, each produced on a helper thread while the consumer works on the previous."""
    with ThreadPoolExecutor(1, thread_name_prefix="rerank-pack") as pool:
        pending = pool.submit(next, items, None)
        while (item := pending.result()) is not None:
            pending = pool.submit(next, items, None)
            yield item


def check_chunk(chunk: int) -> int:
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive number of candidates, got {chunk!r}")
    return chunk


RunChunk = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (tokens, counts) -> matches


class ChunkedReranker(ABC):
    """A runner of the re-rank graph: one query's tokens go up once, candidates chunk by chunk.

    Subclasses bind a query (``_bound``) and return the function that runs one chunk.
    """

    shape: GraphShape
    chunk: int

    @abstractmethod
    def _bound(
        self, query: np.ndarray, query_count: int, threshold: np.float32
    ) -> AbstractContextManager[RunChunk]: ...

    def count_many(
        self,
        queries: Sequence[np.ndarray],
        candidate_lists: Sequence[Sequence[np.ndarray]],
        threshold: float,
    ) -> list[np.ndarray]:
        """Scores (int64, one array per query) of (N, D) token sets, as the CPU re-ranker's."""
        thr = threshold_f32(threshold)
        for qi, (q, cands) in enumerate(zip(queries, candidate_lists)):
            self.shape.check_set(q, f"query {qi}")
            for ki, c in enumerate(cands):
                self.shape.check_set(c, f"candidate {ki} of query {qi}")
        scores = []
        for q, cands in zip(queries, candidate_lists):
            with self._bound(self.shape.pad(q), len(q), thr) as run:
                parts = [
                    run(t, n) for t, n in prefetched(packed_chunks(self.shape, cands, self.chunk))
                ]
            scores.append(np.concatenate([np.zeros(0, np.int64), *parts]).astype(np.int64))
        return scores

    def score_padded(
        self,
        query: np.ndarray,
        query_count: int,
        candidates: np.ndarray,
        candidate_counts: np.ndarray,
        threshold: float,
    ) -> np.ndarray:
        """Scores (int64) of candidates already padded to the capacity, as a token store or
        reference.npz holds them: (n, capacity, dim) tokens and their counts."""
        counts = self.shape.check_padded(candidates, candidate_counts, "candidate")
        (nq,) = self.shape.check_padded(query[None], np.array([query_count]), "query")
        q = np.ascontiguousarray(query, np.float32)
        with self._bound(q, int(nq), threshold_f32(threshold)) as run:
            chunks = prefetched(padded_chunks(self.shape, candidates, counts, self.chunk))
            parts = [run(t, n) for t, n in chunks]
        return np.concatenate([np.zeros(0, np.int64), *parts]).astype(np.int64)
