"""`fol-infer verify`'s re-ranker check: rerank.onnx (or the rerank engine) against the counts
the CPU re-ranker gave at export on the bundle's reference tokens.

The counts are integers, so the check is equality: the graph has exactly spec section 7's
semantics or it fails. The reference sets (``rerank_graph.reference_sets``) pair every
reference image with every image whole and truncated, with float32 candidates and with
candidates rounded to float16 as an index stores them; the TensorRT engine takes float16
candidates, so it is held to the second set of counts only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fol_infer.bundle import Bundle
from fol_infer.choices import RerankBackend
from fol_infer.errors import BundleError
from fol_infer.rerank.chunks import ChunkedReranker
from fol_infer.rerank.graph import reference_sets


@dataclass(frozen=True)
class RerankCheck:
    runner: str  # what ran, e.g. "rerank.onnx (CPUExecutionProvider)"
    pairs: int
    equal: int
    first_difference: str  # "" when every count is equal

    @property
    def passed(self) -> bool:
        return self.pairs > 0 and self.equal == self.pairs


def check_rerank(bundle: Bundle, backend: RerankBackend = RerankBackend.ONNX) -> RerankCheck:
    """Run the bundle's re-rank graph ("onnx") or engine ("trt") on the reference sets."""
    from fol_infer.parity import load_reference

    bundle.rerank_graph()  # an older bundle: the message says to re-export
    reference = load_reference(bundle)
    if "rerank_counts" not in reference:
        raise BundleError(
            f"{bundle.path('reference')} has no re-rank reference counts: re-export the bundle"
        )
    runner: ChunkedReranker
    formats: tuple[str, ...]
    if backend == RerankBackend.TRT:
        from fol_infer.rerank.trt_runner import bundle_trt_reranker

        runner, name, formats = bundle_trt_reranker(bundle), "rerank engine", ("fp16",)
    else:
        from fol_infer.rerank.onnx_runner import bundle_reranker

        onnx_runner = bundle_reranker(bundle)
        runner, formats = onnx_runner, ("fp32", "fp16")
        name = f"rerank.onnx ({onnx_runner.provider})"
    queries, candidates = reference_sets(reference["tokens"], reference["count"])
    threshold = float(reference["rerank_threshold"])
    pairs = equal = 0
    first = ""
    for fmt in formats:
        expected = reference["rerank_counts" if fmt == "fp32" else "rerank_counts_fp16"]
        cands = candidates if fmt == "fp32" else [c.astype(np.float16) for c in candidates]
        got = np.stack(runner.count_many(queries, [cands] * len(queries), threshold))
        if got.shape != expected.shape:
            raise BundleError(
                f"{bundle.path('reference')} holds re-rank counts of shape {expected.shape}, "
                f"not {got.shape}: re-export the bundle"
            )
        same = got == expected
        pairs, equal = pairs + same.size, equal + int(same.sum())
        if not first and not same.all():
            q, k = (int(i) for i in np.argwhere(~same)[0])
            first = (
                f"{fmt} candidates: query {q}, candidate set {k}: {int(got[q, k])} matches, "
                f"the CPU re-ranker {int(expected[q, k])}"
            )
    return RerankCheck(runner=name, pairs=pairs, equal=equal, first_difference=first)
