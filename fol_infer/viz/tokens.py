"""Where FoL's regions and tokens sit in an image (spec sections 5-6), for drawing them.

- A region is one of the 225 patches of the h x w grid the local branch keeps: patch (r, c)
  covers model pixels [14c, 14c + 14) x [14r, 14r + 14).
- A token is one position of the H' x W' grid (H' = 4h - 3) of the two stride-2 transposed
  convolutions, kept when its nearest-upsampled source patch floor(row * h / H') is a region;
  tokens are listed in row-major order of that grid (as the local graph lists them). Output
  position o of a stride-2, padding-1, kernel-3 transposed convolution is centred on input
  position o / 2, so token (row, col) is centred on patch coordinates (row / 4, col / 4), i.e.
  model pixel 7 + 3.5 * row (the centre of patch 0 is pixel 7). The mask's nearest rule and
  this centring differ slightly, so a token lies in, or within half a patch of, the region
  that kept it (tested).

Model pixels map to the original image by the hard resize's scale (spec section 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fol_infer.backends.base import Encoder
from fol_infer.bundle import Bundle
from fol_infer.images import load_rgb, preprocess

PATCH = 14


@dataclass(frozen=True)
class EncodedImage:
    """One image through both branches, with what is needed to place its regions and tokens."""

    source: str
    pixels: np.ndarray  # (H, W, 3) float32 in [0, 1]: the original, as displayed
    resolution: tuple[int, int]  # model input (height, width) in pixels
    confidence: np.ndarray  # (h, w) region confidence
    region_mask: np.ndarray  # (h, w) bool: the 225 kept patches
    tokens: np.ndarray  # (N, 128) float32: the real tokens, row-major grid order
    bundle: str  # the bundle's fingerprint: tokens of two bundles are not comparable

    @property
    def scale(self) -> tuple[float, float]:
        """(x, y) original pixels per model pixel."""
        height, width = self.pixels.shape[:2]
        return width / self.resolution[1], height / self.resolution[0]


def encode_image(encoder: Encoder, bundle: Bundle, path: str | Path) -> EncodedImage:
    """Run ``path`` through the global and local branches of ``encoder``."""
    batch = preprocess(path, bundle.resolution)[None]
    out = encoder.encode(batch)
    assert out.local is not None
    count = int(out.local.counts[0])
    return EncodedImage(
        source=str(path),
        pixels=load_rgb(path),
        resolution=tuple(bundle.resolution),  # type: ignore[arg-type]
        confidence=np.asarray(out.global_.confidence[0], np.float32),
        region_mask=np.asarray(out.local.region_mask[0], bool),
        tokens=np.asarray(out.local.tokens[0, :count], np.float32),
        bundle=bundle.manifest.fingerprint,
    )


def region_boxes(image: EncodedImage) -> tuple[np.ndarray, np.ndarray]:
    """The kept regions as (x0, y0, x1, y1) boxes in original pixels, and their confidences,
    most confident first."""
    rows, cols = np.nonzero(image.region_mask)
    confidence = image.confidence[rows, cols]
    order = np.argsort(-confidence, kind="stable")
    rows, cols, confidence = rows[order], cols[order], confidence[order]
    sx, sy = image.scale
    boxes = np.stack(
        [cols * PATCH * sx, rows * PATCH * sy, (cols + 1) * PATCH * sx, (rows + 1) * PATCH * sy],
        axis=1,
    )
    return boxes.astype(np.float64), confidence


def token_cells(region_mask: np.ndarray) -> np.ndarray:
    """(N, 2) (row, col) of each token in the H' x W' grid, in the order the tokens come."""
    h, w = region_mask.shape
    big_h, big_w = 4 * h - 3, 4 * w - 3
    source_rows = np.arange(big_h) * h // big_h  # PyTorch 'nearest'
    source_cols = np.arange(big_w) * w // big_w
    kept = region_mask[source_rows[:, None], source_cols[None, :]]
    return np.argwhere(kept)  # row-major


def token_xy(image: EncodedImage) -> np.ndarray:
    """(N, 2) (x, y) centre of each token in original pixels, in token order."""
    cells = token_cells(image.region_mask).astype(np.float64)
    model = PATCH / 2 + cells * (PATCH / 4)  # centre of patch 0 is pixel 7; 3.5 px per cell
    sx, sy = image.scale
    xy = np.stack([model[:, 1] * sx, model[:, 0] * sy], axis=1)
    if len(xy) != len(image.tokens):
        raise RuntimeError(
            f"{image.source}: {len(xy)} token positions for {len(image.tokens)} tokens; the "
            "bundle's local graph does not follow the spec's region upsampling"
        )
    return xy
