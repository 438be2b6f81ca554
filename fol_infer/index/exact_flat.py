"""Exact top-k of a flat inner-product FAISS index at BLAS speed, scores independent of the batch.

FAISS (1.15) scores a flat index either query by query with its SIMD kernel, or with blocked
BLAS products: for 16 or more queries of dim 8448 (``nq * d >= 128000``), and for a batch of
fewer queries than threads over 10,000 or more vectors. The rounding of those products
depends on the batch, the database's size and the thread count, so a query would score
differently alone, in a batch, in a single index or in a map's shard.

Here FAISS's own search (whichever path it takes) only *selects*: a candidate is every vector
whose FAISS score is within 4 rounding bounds of the query's k-th best (a float32 dot product
of length d, in any summation order, is off by at most gamma_d |q| |x| + d 2^-150, with
gamma_d = d u / (1 - d u), u = 2^-24). FAISS is asked for more than k, and for more again
(the queries concerned only) until its last score falls below that floor. Candidates are
scored again with FAISS's per-pair kernel (``pairwise_indexed_inner_product``, the one its
query-by-query search runs), whose result depends on the query and the vector alone. Any
other vector scores strictly below k of the candidates, whatever the rounding, so it cannot
be in the top k. Everything runs on FAISS's threads (a second BLAS thread pool would fight
its OpenMP threads for the cores).

Equal scores go larger id first (FAISS's order within a list), and that same order decides
which of them make the top k: a total order, so the top lists of a map's shards merge to
exactly this one (`index.shards.merge_top_k`). FAISS's own heap keeps whichever equal scores
its scan order lets in, which no merge of shard lists can reproduce.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_NORM_ROWS = 4096  # rows per step when taking the database's largest norm
_U = 2.0**-24  # float32 unit roundoff
_SLACK = 1 + 2.0**-20  # float64 arithmetic on the bound itself
_NO_OVERFLOW = 2.0**127  # |q| |x| below this: no float32 product or partial sum overflows
_FIRST_EXTRA = 16  # FAISS is first asked for 2 k + this many; 4 times more for a query short


def is_flat_inner_product(index: Any) -> bool:
    """True for FAISS's exact flat index under inner product (the "Flat" factory)."""
    import faiss

    flat = faiss.downcast_index(index)
    return type(flat) in (faiss.IndexFlat, faiss.IndexFlatIP) and (
        flat.metric_type == faiss.METRIC_INNER_PRODUCT
    )


def _largest_norm(x: np.ndarray) -> float:
    """max_i ||x_i||, computed in float64 a few thousand rows at a time."""
    best = 0.0
    for a in range(0, len(x), _NORM_ROWS):
        rows = x[a : a + _NORM_ROWS].astype(np.float64)
        best = max(best, float(np.sqrt(np.einsum("ij,ij->i", rows, rows).max(initial=0.0))))
    return best


class ExactFlat:
    """Searches a flat inner-product FAISS index (see the module doc) that is only ever
    appended to, as GlobalIndex does."""

    def __init__(self, index: Any):
        self._index = index
        self._norm, self._normed = 0.0, 0  # the largest norm of the first `_normed` vectors

    def _vectors(self) -> np.ndarray:
        import faiss

        n, d = int(self._index.ntotal), int(self._index.d)
        return faiss.rev_swig_ptr(self._index.get_xb(), n * d).reshape(n, d)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(nq, k) float32 scores, descending, and int64 ids; queries are float32, C order."""
        import faiss

        xb = self._vectors()
        d = xb.shape[1]
        margin = self._margin(xb, queries)
        query, ids = self._candidates(queries, k, margin)
        by_vector = np.argsort(ids, kind="stable")  # each vector read once, for all its queries
        query, ids = query[by_vector], ids[by_vector]
        scores = np.empty(len(ids), np.float32)
        faiss.pairwise_indexed_inner_product(  # type: ignore[attr-defined]  # not in its stubs
            d,
            len(ids),
            faiss.swig_ptr(queries),
            faiss.swig_ptr(query),
            faiss.swig_ptr(xb),
            faiss.swig_ptr(ids),
            faiss.swig_ptr(scores),
        )
        order = np.lexsort((-ids, -scores, query))  # by query, score descending, larger id first
        starts = np.searchsorted(query[order], np.arange(len(queries)))
        best = order[(starts[:, None] + np.arange(k)).ravel()]
        return scores[best].reshape(-1, k), ids[best].reshape(-1, k)

    def _margin(self, xb: np.ndarray, queries: np.ndarray) -> np.ndarray:
        """Per query, twice the largest gap between two roundings of one of its products."""
        self._norm = max(self._norm, _largest_norm(xb[self._normed :]))
        self._normed = len(xb)
        d = xb.shape[1]
        gamma = d * _U / (1 - d * _U)
        reach = np.linalg.norm(queries.astype(np.float64), axis=1) * self._norm
        bound = (gamma * reach + d * 2.0**-150) * _SLACK
        return np.where(reach < _NO_OVERFLOW, 4 * bound, np.inf)

    def _candidates(
        self, queries: np.ndarray, k: int, margin: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(query, id) pairs: for each query, every id whose FAISS score is within `margin`
        of the query's k-th best (the whole database where the scores may overflow)."""
        n = int(self._index.ntotal)
        width, todo = min(n, 2 * k + _FIRST_EXTRA), np.arange(len(queries))
        query, ids = [], []
        while len(todo):
            scores, found = self._index.search(queries[todo], width)
            floor, bounded = np.full(len(todo), -np.inf), np.isfinite(margin[todo])
            floor[bounded] = scores[bounded, k - 1] - margin[todo][bounded]
            keep = ~(scores < floor[:, None])  # NaN (an overflow) is kept
            done = (width == n) | (scores[:, -1] < floor)
            rows, cols = np.nonzero(keep & done[:, None])
            query.append(todo[rows])
            ids.append(found[rows, cols])
            todo, width = todo[~done], min(n, 4 * width)
        return np.concatenate(query), np.concatenate(ids).astype(np.int64)
