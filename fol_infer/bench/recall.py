"""Ground truth and Recall@N as the published FoL evaluation computes them (spec section 8).

Facts taken from the published code (chenshunpeng/FoL: ``datasets.py`` and ``test_FoL.py``):

- positives: database images within 25 m of the query, UTM Euclidean distance, boundary
  included (sklearn's ``radius_neighbors`` keeps ``distance <= radius``): computed in
  `fol_infer.positions.positives`, which also takes lat/lon positions;
- Recall@N: share of *all* queries, in percent, with a positive among the first N predictions.
  A query with no positive within the radius stays in the denominator and can only miss;
- predictions are ``min(max(N), database size)`` long and ``pred[:N]`` is read, so R@N with N
  beyond the database is taken over the whole (completely ranked) database.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RECALL_NS: tuple[int, ...] = (1, 5, 10, 25, 100)


def recall_at(
    predictions: np.ndarray,
    positives: Sequence[np.ndarray],
    ns: Sequence[int] = RECALL_NS,
    num_database: int | None = None,
) -> dict[str, float | None]:
    """Recall@N in percent, keyed ``"R@N"``, for ranked database indices (Q, K).

    Entries < 0 (FAISS pads short result lists with -1) are never positives. For N > K the
    K predictions are a complete ranking only when they cover the whole database, so R@N is
    computed (over the whole database, as the published code does) when ``K >= num_database``
    and is None otherwise: a truncated list cannot tell whether a positive sits at rank K+1.
    """
    preds = np.asarray(predictions)
    if preds.ndim != 2:
        raise ValueError(f"predictions must be (queries, K), got shape {preds.shape}")
    q, k = preds.shape
    if len(positives) != q:
        raise ValueError(f"{q} prediction rows but {len(positives)} positive lists")
    if q == 0:
        raise ValueError("no queries: recall is undefined")
    if any(n < 1 for n in ns):
        raise ValueError(f"recall cut-offs must be >= 1, got {tuple(ns)}")
    first_hit = np.full(q, np.iinfo(np.int64).max)  # rank of the first positive, if any
    for i, (row, pos) in enumerate(zip(preds, positives, strict=True)):
        hits = np.flatnonzero(np.isin(row, pos) & (row >= 0))
        if hits.size:
            first_hit[i] = hits[0]
    complete = num_database is not None and k >= num_database
    return {
        f"R@{n}": float(100.0 * np.mean(first_hit < n)) if n <= k or complete else None for n in ns
    }
