"""The re-ranking score of spec section 7, written the obvious way; tests only.

S is materialised whole in float64, so on small integer-valued tokens every product is exact
and ties are real ties, which is what the property tests need to pin the tie rules down.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def reference_score(query: np.ndarray, candidate: np.ndarray, threshold: float = 0.7) -> int:
    """Mutual nearest-neighbour pairs (i, j(i)) with S[i, j(i)] > threshold."""
    q = np.asarray(query, np.float64)
    r = np.asarray(candidate, np.float64)
    if q.shape[0] == 0 or r.shape[0] == 0:
        return 0
    s = q @ r.T
    j_of_i = s.argmax(axis=1)  # numpy's argmax returns the first maximum: lowest index wins
    i_of_j = s.argmax(axis=0)
    rows = np.arange(q.shape[0])
    mutual = i_of_j[j_of_i] == rows
    return int(np.count_nonzero(mutual & (s[rows, j_of_i] > threshold)))


def reference_scores(
    query: np.ndarray, candidates: Sequence[np.ndarray], threshold: float = 0.7
) -> np.ndarray:
    """Scores of every candidate, int64 (K,)."""
    return np.array([reference_score(query, c, threshold) for c in candidates], np.int64)


def reference_order(scores: np.ndarray) -> np.ndarray:
    """Candidates by score descending, ties by original rank: a plain O(K^2)-free key sort."""
    return np.array(sorted(range(len(scores)), key=lambda k: (-int(scores[k]), k)), np.intp)
