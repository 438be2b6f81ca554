"""Deterministic reference inputs and the PyTorch outputs on them (``reference.npz``).

`fol-infer verify` re-runs these inputs through any backend and compares: the inputs are
smooth synthetic pictures, already pre-processed, so that the check does not depend on an
image decoder or on files outside the bundle.
"""

from __future__ import annotations

import numpy as np

from fol_infer.bundle import IMAGENET_MEAN, IMAGENET_STD

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
