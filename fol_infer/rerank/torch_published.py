"""The published re-ranking formulation in torch: the baseline the CPU and Triton kernels beat.

Kept deliberately close to how the published evaluation computes the score: every candidate
padded into one (K, Nmax, D) tensor, S materialised for all K at once as (K, Nmax, Nq), argmax
both ways, then a Python loop over candidates counting pairs. Two deliberate departures, both
from spec section 7: a candidate with exactly one passing mutual pair scores 1 (the published
squeeze quirk scores it 0), and ties go to the lowest index (torch's argmax returns the first
maximal index on CPU and CUDA). torch is imported inside the function: the CPU runtime never
needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fol_infer.rerank.cpu import threshold_f32
from fol_infer.rerank.settings import DEFAULT_THRESHOLD


def count_mutual_matches_many_torch(
    queries: Sequence[np.ndarray],
    candidate_lists: Sequence[Sequence[np.ndarray]],
    threshold: float = DEFAULT_THRESHOLD,
    *,
    device: str = "cpu",
) -> list[np.ndarray]:
    """Scores (int64, one array per query), one query at a time as the published code does."""
    import torch

    dev = torch.device(device)
    thr = float(threshold_f32(threshold))  # exact in float32, as torch compares in float32
    return [
        _score_query(torch, query, candidates, thr, dev)
        for query, candidates in zip(queries, candidate_lists, strict=True)
    ]


def _score_query(
    torch: Any, query: np.ndarray, candidates: Sequence[np.ndarray], threshold: float, dev: Any
) -> np.ndarray:
    """All K candidates of one query in one padded batch."""
    k = len(candidates)
    scores = np.zeros(k, np.int64)
    lengths = [c.shape[0] for c in candidates]
    if k == 0 or query.shape[0] == 0 or max(lengths) == 0:
        return scores
    q = torch.as_tensor(np.asarray(query), device=dev).float()
    n_max = max(lengths)
    r = torch.zeros((k, n_max, q.shape[1]), dtype=torch.float32, device=dev)
    for ki, c in enumerate(candidates):
        r[ki, : lengths[ki]] = torch.as_tensor(np.asarray(c), device=dev).float()
    s = torch.matmul(r, q.T)  # (K, Nmax, Nq): the whole similarity volume at once
    # Padding must not change any result. Zero padding would give padded rows S = 0, which
    # wins a query token's argmax whenever all its real similarities are negative: harmless
    # for a threshold >= 0 (such a pair cannot pass), wrong for a negative one. Filling the
    # padded rows with -inf instead means they lose every argmax over j to a real row (inputs
    # are finite), so j(i) is always a real token; their own argmax over i is computed but
    # never read, because only i(j(i)) is looked up.
    for ki, n in enumerate(lengths):
        s[ki, n:] = float("-inf")
    best_r = s.argmax(dim=1)  # (K, Nq): j(i), first maximal candidate token
    best_q = s.argmax(dim=2)  # (K, Nmax): i(j), first maximal query token
    rows = torch.arange(q.shape[0], device=dev)
    for ki in range(k):
        if lengths[ki] == 0:
            continue
        j = best_r[ki]
        mutual = best_q[ki, j] == rows
        passing = s[ki, j, rows] > threshold
        scores[ki] = int((mutual & passing).sum().item())
    return scores
