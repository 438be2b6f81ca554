"""The one interface every encoder backend (torch, onnx, trt) implements.

A backend turns pre-processed images into FoL outputs. The global branch and the local branch
are separate calls so that a query answered from the global descriptor alone never pays for
the local branch; `encode` runs both and shares the backbone's work between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

GLOBAL_DIM = 8448
TOKEN_DIM = 128
MAX_TOKENS = 3600  # 225 selected patches x at most 16 upsampled positions each
REGION_PATCHES = 225


@dataclass
class GlobalOutput:
    """Global branch results for a batch of B images at h x w patches."""

    descriptors: np.ndarray  # (B, 8448) float32, unit norm
    features: np.ndarray  # (B, C, h, w) float32: backbone patch features, input of the local branch
    confidence: np.ndarray  # (B, h, w) float32: region confidence (softmax over h*w)


@dataclass
class LocalOutput:
    """Local branch results: re-ranking tokens of the selected discriminative regions."""

    tokens: np.ndarray  # (B, 3600, 128) float32, unit rows, row-major grid order, zero padded
    counts: np.ndarray  # (B,) int64: real tokens per image (rows after it are zero)
    region_mask: np.ndarray  # (B, h, w) bool: the 225 selected patches


@dataclass
class EncoderOutput:
    """Everything one image batch yields; `local` is None when only the global branch ran."""

    global_: GlobalOutput
    local: LocalOutput | None

    @property
    def descriptors(self) -> np.ndarray:
        return self.global_.descriptors

    def token_list(self) -> list[np.ndarray]:
        """Each image's real tokens, without padding (what the re-ranker and the store take)."""
        if self.local is None:
            raise ValueError("the local branch did not run for this batch")
        return [t[:n] for t, n in zip(self.local.tokens, self.local.counts.tolist())]


@runtime_checkable
class Encoder(Protocol):
    """An FoL encoder at a fixed input resolution.

    Inputs are pre-processed batches (see `fol_infer.images.preprocess`): float32
    (B, 3, H, W) with (H, W) == `resolution`.
    """

    name: str
    resolution: tuple[int, int]

    def encode_global(self, images: np.ndarray) -> GlobalOutput: ...

    def encode_local(self, global_out: GlobalOutput) -> LocalOutput: ...

    def encode(self, images: np.ndarray, local: bool = True) -> EncoderOutput: ...

    def close(self) -> None: ...


class EncoderBase:
    """Shared input checks and the `encode` composition; subclasses supply the two branches."""

    name: str = "base"
    resolution: tuple[int, int]

    def check_images(self, images: np.ndarray) -> np.ndarray:
        """Fail with a clear message before a runtime fails with an obscure one."""
        from fol_infer.errors import UsageError

        if images.ndim != 4 or images.shape[1] != 3:
            raise UsageError(f"expected images of shape (B, 3, H, W), got {images.shape}")
        if tuple(images.shape[2:]) != tuple(self.resolution):
            h, w = self.resolution
            raise UsageError(
                f"images are {images.shape[2]}x{images.shape[3]} but this {self.name} engine "
                f"was built for {h}x{w}: pre-process with fol_infer.images.preprocess(..., "
                f"size=({h}, {w})) or export a bundle at that resolution"
            )
        return np.ascontiguousarray(images, dtype=np.float32)

    def encode_global(self, images: np.ndarray) -> GlobalOutput:
        raise NotImplementedError

    def encode_local(self, global_out: GlobalOutput) -> LocalOutput:
        raise NotImplementedError

    def encode(self, images: np.ndarray, local: bool = True) -> EncoderOutput:
        g = self.encode_global(images)
        return EncoderOutput(global_=g, local=self.encode_local(g) if local else None)

    def close(self) -> None:
        """Release sessions and device memory; safe to call twice."""

    def __enter__(self) -> EncoderBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
