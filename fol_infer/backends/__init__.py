"""Encoder backends behind one interface (`base.Encoder`); `open_encoder` picks one by name."""

from __future__ import annotations

from pathlib import Path

from fol_infer.backends.base import Encoder, EncoderOutput, GlobalOutput, LocalOutput
from fol_infer.bundle import Bundle
from fol_infer.errors import UsageError

BACKENDS = ("onnx", "torch", "trt")


def open_encoder(
    bundle: Bundle,
    backend: str = "onnx",
    checkpoint: str | Path | None = None,
    threads: int | None = None,
) -> Encoder:
    """Open a bundle with the named backend; heavy imports happen only for the one chosen."""
    if backend == "onnx":
        from fol_infer.backends.onnx import OnnxEncoder

        return OnnxEncoder(bundle, threads=threads)
    if backend == "torch":
        from fol_infer.backends.torch import TorchEncoder

        return TorchEncoder.from_bundle(bundle, checkpoint, threads=threads)
    if backend == "trt":
        from fol_infer.backends.trt import TrtEncoder

        return TrtEncoder(bundle)
    raise UsageError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Encoder", "EncoderOutput", "GlobalOutput", "LocalOutput", "open_encoder"]
