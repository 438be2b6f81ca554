"""The re-ranking settings, in one frozen object checked once.

The threshold is the paper's one knob: a token pair counts as a match only when its cosine
similarity is above it. `Retriever`, ``fol-infer query --threshold`` and ``fol-infer bench
--threshold`` build a `RerankSettings`; every backend reads its threshold from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Real
from typing import Any

from fol_infer.choices import RerankBackend, TokenFormat
from fol_infer.errors import UsageError

DEFAULT_THRESHOLD = 0.7  # the published value (spec section 7)
DEFAULT_BLOCK_BYTES = 8 << 20  # CPU tile per worker: ~600 x 3,400; amortises packing Q in sgemm


def check_threshold(threshold: Any) -> float:
    """The threshold as a float, or a `UsageError`: FoL's tokens are unit vectors, so a
    similarity is a cosine in [-1, 1] and a pair matches when it is above the threshold; at 1
    or beyond nothing can match (every count 0), and NaN compares false with everything."""
    if not isinstance(threshold, Real) or not -1.0 <= float(threshold) < 1.0:
        raise UsageError(
            "re-ranking threshold must be a finite number in [-1, 1) (a cosine similarity; "
            f"the published value is {DEFAULT_THRESHOLD}), got {threshold!r}"
        )
    return float(threshold)


@dataclass(frozen=True)
class RerankSettings:
    """How candidates are re-ranked: threshold, backend, CPU tile size and worker threads.

    ``workers`` None means `fol_infer.rerank.cpu.default_workers()`.
    """

    threshold: float = DEFAULT_THRESHOLD
    backend: RerankBackend = field(default=RerankBackend.AUTO)
    block_bytes: int = DEFAULT_BLOCK_BYTES
    workers: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", check_threshold(self.threshold))
        backend = RerankBackend.parse(self.backend, "re-ranking backend")
        object.__setattr__(self, "backend", backend)
        if int(self.block_bytes) < 1:
            raise UsageError(f"re-ranking block must be at least 1 byte, got {self.block_bytes}")
        if self.workers is not None and int(self.workers) < 1:
            raise UsageError(f"re-ranking workers must be at least 1, got {self.workers}")

    def check_tokens(self, tokens: TokenFormat | str, where: str) -> None:
        """Refuse a backend that cannot score `where`'s token format (before any work starts)."""
        cpu_only = (RerankBackend.AUTO, RerankBackend.CPU)
        if tokens == TokenFormat.INT8_EXACT and self.backend not in cpu_only:
            raise UsageError(
                f"{where} keeps int8-exact tokens, which are re-ranked on the CPU by the "
                f"certified CPU re-ranker; the {self.backend} re-ranker cannot score them: "
                "choose auto or cpu, or an fp16 index"
            )
