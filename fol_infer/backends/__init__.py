"""Encoder backends behind one interface (`base.Encoder`); `open_encoder` picks one by name."""

from __future__ import annotations

from pathlib import Path

from fol_infer.backends.base import Encoder, EncoderOutput, GlobalOutput, LocalOutput
from fol_infer.bundle import Bundle
from fol_infer.choices import EncoderBackend
from fol_infer.errors import UsageError


def open_encoder(
    bundle: Bundle,
    backend: EncoderBackend | str = EncoderBackend.ONNX,
    checkpoint: str | Path | None = None,
    threads: int | None = None,
) -> Encoder:
    """Open a bundle with the named backend; heavy imports happen only for the one chosen.
    `checkpoint` (the torch backend's weights, default: the bundle's) is refused for another
    backend rather than ignored."""
    backend = EncoderBackend.parse(backend, "backend")
    if checkpoint is not None and backend != EncoderBackend.TORCH:
        raise UsageError(
            f"a checkpoint is read by the torch backend only, not by {backend}: drop "
            "--checkpoint, or choose --backend torch"
        )
    if backend == EncoderBackend.ONNX:
        from fol_infer.backends.onnx import OnnxEncoder

        return OnnxEncoder(bundle, threads=threads)
    if backend == EncoderBackend.TORCH:
        from fol_infer.backends.torch import TorchEncoder

        return TorchEncoder.from_bundle(bundle, checkpoint, threads=threads)
    from fol_infer.backends.trt import TrtEncoder

    return TrtEncoder(bundle)


__all__ = ["Encoder", "EncoderOutput", "GlobalOutput", "LocalOutput", "open_encoder"]
