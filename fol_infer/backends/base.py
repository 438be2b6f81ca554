"""The one interface every encoder backend (torch, onnx, trt) implements.

A backend turns pre-processed images into FoL outputs. The global branch and the local branch
are separate calls so that a query answered from the global descriptor alone never pays for
the local branch; `encode` runs both and shares the backbone's work between them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import numpy as np

from fol_infer.choices import Precision
from fol_infer.errors import UsageError

E = TypeVar("E", bound="Encoder")


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


class Encoder(ABC):
    """An FoL encoder at a fixed input resolution: the contract every backend implements.

    Inputs are pre-processed batches (see `fol_infer.images.preprocess`): float32
    (B, 3, H, W) with (H, W) == `resolution`. The public methods check their inputs here,
    once, and hand them to the subclass's ``_encode_*_impl`` (Polygraphy's ``infer`` /
    ``infer_impl`` split), so every backend refuses bad input with the same message.
    """

    name: ClassVar[str]
    resolution: tuple[int, int]
    precision: Precision = Precision.FP32  # arithmetic of the engine: picks parity tolerances

    def encode_global(self, images: np.ndarray) -> GlobalOutput:
        """Descriptor, backbone features and region confidence of each image."""
        return self._encode_global_impl(self.check_images(images))

    def encode_local(self, global_out: GlobalOutput) -> LocalOutput:
        """Re-ranking tokens of the regions `encode_global` found."""
        return self._encode_local_impl(global_out)

    def encode(self, images: np.ndarray, local: bool = True) -> EncoderOutput:
        """Both branches (or the global one alone), sharing the backbone's work."""
        return self._encode_impl(self.check_images(images), local)

    def check_images(self, images: np.ndarray) -> np.ndarray:
        """Fail with a clear message before a runtime fails with an obscure one."""
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

    @abstractmethod
    def _encode_global_impl(self, images: np.ndarray) -> GlobalOutput:
        """The global branch on images already checked."""

    @abstractmethod
    def _encode_local_impl(self, global_out: GlobalOutput) -> LocalOutput:
        """The local branch."""

    def _encode_impl(self, images: np.ndarray, local: bool) -> EncoderOutput:
        """Both branches on images already checked; a backend may fuse them."""
        g = self._encode_global_impl(images)
        return EncoderOutput(global_=g, local=self._encode_local_impl(g) if local else None)

    def close(self) -> None:  # noqa: B027 - not abstract: the torch reference holds nothing to free
        """Release sessions and device memory; safe to call twice."""

    def __enter__(self: E) -> E:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
