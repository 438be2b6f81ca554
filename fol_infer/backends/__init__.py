"""Encoder backends behind one interface (`base.Encoder`); `open_encoder` picks one by name."""

from __future__ import annotations

from pathlib import Path

from fol_infer.backends.base import Encoder, EncoderOutput, GlobalOutput, LocalOutput
from fol_infer.bundle import Bundle
from fol_infer.choices import EncoderBackend


def open_encoder(
    bundle: Bundle,
    backend: EncoderBackend | str = EncoderBackend.ONNX,
    checkpoint: str | Path | None = None,
    threads: int | None = None,
) -> Encoder:
    """Open a bundle with the named backend; heavy imports happen only for the one chosen."""
    backend = EncoderBackend.parse(backend, "backend")
    if backend == EncoderBackend.ONNX:
        from fol_infer.backends.onnx import OnnxEncoder

        return OnnxEncoder(bundle, threads=threads)
    if backend == EncoderBackend.TORCH:
        from fol_infer.backends.torch import TorchEncoder

        return TorchEncoder.from_bundle(bundle, checkpoint, threads=threads)
    from fol_infer.backends.trt import TrtEncoder

    return TrtEncoder(bundle)


__all__ = ["Encoder", "EncoderOutput", "GlobalOutput", "LocalOutput", "open_encoder"]
