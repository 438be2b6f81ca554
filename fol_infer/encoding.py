"""Encode image files into arrays, and save them as the `.npz` that ``fol-infer encode`` writes.

The `.npz` holds ``global`` (N, 8448) float32, ``tokens`` (N, 3600, 128) float32 zero padded,
``count`` (N,) int64 real tokens per image and ``paths`` (N,) as given; images that could not
be read are left out and listed in `Encoded.failures`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fol_infer.backends.base import Encoder
from fol_infer.files.atomic import write_outputs
from fol_infer.images import ImageSource
from fol_infer.loader import Failure, iter_batches
from fol_infer.model.arch import GLOBAL_DIM, MAX_TOKENS, TOKEN_DIM
from fol_infer.progress import Advance


@dataclass
class Encoded:
    """What an image set encodes to: one row per image that decoded, in input order."""

    descriptors: np.ndarray  # (N, 8448) float32
    tokens: np.ndarray  # (N, 3600, 128) float32, zero padded
    counts: np.ndarray  # (N,) int64
    paths: list[str]
    failures: list[Failure] = field(default_factory=list)

    def token_list(self) -> list[np.ndarray]:
        """Each image's real tokens, without padding."""
        return [t[:n] for t, n in zip(self.tokens, self.counts.tolist())]

    def save_npz(self, out: Path | str) -> None:
        """Write the `.npz` atomically: a failed or interrupted write (disk full:
        `OutputWriteError`) leaves any old file as it was."""
        arrays = {
            "global": self.descriptors,
            "tokens": self.tokens,
            "count": self.counts,
            "paths": np.array(self.paths),
        }
        write_outputs({Path(out): lambda f: np.savez(f, **arrays)})  # type: ignore[arg-type]


def encode_images(
    encoder: Encoder,
    sources: Sequence[ImageSource],
    batch: int = 8,
    strict: bool = False,
    progress: Advance | None = None,
) -> Encoded:
    """Encode `sources` at the encoder's resolution, `batch` images per forward pass.

    Unreadable images are recorded as failures, or raise their ImageError with `strict`.
    """
    descriptors: list[np.ndarray] = []
    tokens: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    names: list[str] = []
    failures: list[Failure] = []
    for chunk in iter_batches(sources, encoder.resolution, batch, strict=strict):
        failures.extend(chunk.failures)
        if chunk.indices:
            result = encoder.encode(chunk.images)
            assert result.local is not None
            descriptors.append(result.descriptors)
            tokens.append(result.local.tokens)
            counts.append(result.local.counts.astype(np.int64))
            names.extend(str(sources[i]) for i in chunk.indices)
        if progress is not None:
            progress(len(chunk.indices) + len(chunk.failures))
    if not names:  # nothing decoded: empty arrays of the published widths
        shapes = ((0, GLOBAL_DIM), (0, MAX_TOKENS, TOKEN_DIM))
        descriptors, tokens = [np.empty(shapes[0], np.float32)], [np.empty(shapes[1], np.float32)]
        counts = [np.empty(0, np.int64)]
    return Encoded(
        np.concatenate(descriptors), np.concatenate(tokens), np.concatenate(counts), names, failures
    )
