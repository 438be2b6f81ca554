"""ONNX Runtime backend: the CPU runtime (no torch), and CUDA/TensorRT EPs when installed."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from fol_infer.backends.base import Encoder, GlobalOutput, LocalOutput
from fol_infer.bundle import Bundle
from fol_infer.errors import BackendUnavailableError, BundleError

log = logging.getLogger(__name__)

# Best first; onnxruntime-gpu lists the GPU providers only where they can load.
PREFERRED_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise BackendUnavailableError(
                f"onnxruntime provider(s) {', '.join(missing)} not available (have "
                f"{', '.join(available)}); install onnxruntime-gpu for CUDA/TensorRT"
            )
        return list(requested)
    # The TensorRT EP builds engines on first use (minutes): only on explicit request.
    return [p for p in PREFERRED_PROVIDERS[1:] if p in available]


class OnnxEncoder(Encoder):
    """The bundle's ONNX graphs in onnxruntime: float32, on the CPU unless a GPU provider loads."""

    name = "onnx"

    def __init__(
        self,
        bundle: Bundle,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - a base dependency
            raise BackendUnavailableError(f"onnxruntime is not installed: {exc}") from None
        self.bundle = bundle
        self.resolution = bundle.resolution
        self.providers = choose_providers(providers)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self._sessions: dict[str, ort.InferenceSession] = {}
        for name in ("global", "local"):
            try:
                self._sessions[name] = ort.InferenceSession(
                    str(bundle.path(name)), options, providers=self.providers
                )
            except Exception as exc:  # onnxruntime raises its own untyped errors
                raise BundleError(f"cannot load {bundle.path(name)}: {exc}") from None

    def _run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        session = self._sessions.get(name)
        if session is None:
            raise RuntimeError("this encoder was closed")
        return session.run(None, feeds)

    def _encode_global_impl(self, images: np.ndarray) -> GlobalOutput:
        descriptor, features, confidence = self._run("global", {"image": images})
        return GlobalOutput(descriptors=descriptor, features=features, confidence=confidence)

    def _encode_local_impl(self, global_out: GlobalOutput) -> LocalOutput:
        tokens, count, region = self._run(
            "local", {"features": global_out.features, "confidence": global_out.confidence}
        )
        return LocalOutput(tokens=tokens, counts=count.astype(np.int64), region_mask=region)

    def close(self) -> None:
        self._sessions.clear()
