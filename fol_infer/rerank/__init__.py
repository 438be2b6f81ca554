"""Re-ranking: count mutual nearest-neighbour token matches (spec section 7). The entry points
live in `dispatch` (which backend scores, inputs checked once); the backends beside it are
imported lazily, so importing this package never pulls in torch, triton or tensorrt."""

from fol_infer.rerank.certified import CertifiedScores, count_mutual_matches_certified
from fol_infer.rerank.dispatch import (
    count_mutual_matches,
    count_mutual_matches_many,
    rerank_order,
    score_many,
)
from fol_infer.rerank.settings import DEFAULT_THRESHOLD, RerankSettings

__all__ = [
    "DEFAULT_THRESHOLD",
    "CertifiedScores",
    "RerankSettings",
    "count_mutual_matches",
    "count_mutual_matches_certified",
    "count_mutual_matches_many",
    "rerank_order",
    "score_many",
]
