"""Deterministic reference inputs and the PyTorch outputs on them (``reference.npz``).

`fol-infer verify` re-runs these inputs through any backend and compares: the inputs are
smooth synthetic pictures, already pre-processed, so that the check does not depend on an
image decoder or on files outside the bundle.
"""

from __future__ import annotations

import numpy as np

from fol_infer.bundle import IMAGENET_MEAN, IMAGENET_STD
from fol_infer.rerank.settings import DEFAULT_THRESHOLD

REFERENCE_IMAGES = 2
REFERENCE_SEED = 20250101


def reference_images(resolution: tuple[int, int], count: int = REFERENCE_IMAGES) -> np.ndarray:
    """(count, 3, H, W) float32: normalised sums of random low-frequency waves plus noise."""
    rng = np.random.default_rng(REFERENCE_SEED)
    h, w = resolution
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    images = np.empty((count, 3, h, w), np.float32)
    for i in range(count):
        for c in range(3):
            wave = np.zeros((h, w))
            for _ in range(6):
                fy, fx = rng.uniform(0.5, 8.0, 2)
                wave += np.sin(2 * np.pi * (fy * yy + fx * xx) + rng.uniform(0, 2 * np.pi))
            rgb = 0.5 + 0.08 * wave + 0.05 * rng.standard_normal((h, w))
            images[i, c] = (np.clip(rgb, 0.0, 1.0) - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
    return images


def reference_rerank_counts(
    tokens: np.ndarray, counts: np.ndarray, threshold: float = DEFAULT_THRESHOLD
) -> dict[str, np.ndarray]:
    """The CPU re-ranker's counts on the reference tokens, which `verify` holds rerank.onnx and
    the rerank engine to: (images, sets) int64 for the sets of ``rerank_graph.reference_sets``,
    with float32 candidates and with candidates rounded to float16 (as an index stores them).
    """
    from fol_infer.rerank.cpu import count_mutual_matches_many_cpu
    from fol_infer.rerank.graph import reference_sets

    queries, candidates = reference_sets(tokens, counts)
    halves = [c.astype(np.float16) for c in candidates]
    return {
        "rerank_counts": np.stack(
            count_mutual_matches_many_cpu(queries, [candidates] * len(queries), threshold)
        ),
        "rerank_counts_fp16": np.stack(
            count_mutual_matches_many_cpu(queries, [halves] * len(queries), threshold)
        ),
        "rerank_threshold": np.array(threshold, np.float64),
    }
