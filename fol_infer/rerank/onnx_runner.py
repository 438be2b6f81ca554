"""The ``onnx`` re-ranker: rerank.onnx in ONNX Runtime, CUDA execution provider where installed.

For users with onnxruntime-gpu and no triton (Windows, servers), and a CPU fallback that needs
nothing beyond the runtime's own dependencies. Through an IOBinding the query's tokens go to the
provider's device once per query; candidates follow a chunk at a time, so memory is bounded by
the chunk; TF32 is switched off, so S is float32 on the GPU too. The next chunk is packed on a
helper thread while the current one runs; the copy to the GPU itself happens inside ONNX
Runtime's run and is not overlapped with compute (its Python API offers no asynchronous copy).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np

from fol_infer.bundle import Bundle
from fol_infer.errors import BackendUnavailableError
from fol_infer.rerank.chunks import (
    DEFAULT_CHUNK,
    ChunkedReranker,
    GraphShape,
    RunChunk,
    check_chunk,
)
from fol_infer.rerank.graph import GRAPH_NAME, OUTPUT

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
ADHOC_ROUNDING = 64  # graphs built without a bundle: capacity rounded up to this many tokens


def default_providers() -> list[str]:
    """CUDA where onnxruntime-gpu sees a GPU, else the CPU."""
    import onnxruntime as ort

    return [CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU]


class OnnxReranker(ChunkedReranker):
    """One ONNX Runtime session of the re-rank graph (a file, or a serialized model)."""

    def __init__(
        self,
        model: str | Path | bytes,
        providers: Sequence[str] | None = None,
        chunk: int = DEFAULT_CHUNK,
        threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        source = str(model) if isinstance(model, Path) else model
        # The CUDA provider's float32 MatMul uses TF32 unless told not to: S must be float32.
        chosen = [
            (p, {"use_tf32": "0"}) if p == CUDA else p for p in providers or default_providers()
        ]
        self._session = ort.InferenceSession(source, options, providers=chosen)
        self.provider = self._session.get_providers()[0]
        self._device = "cuda" if self.provider == CUDA else "cpu"
        inputs = {i.name: i for i in self._session.get_inputs()}
        capacity, dim = inputs["query"].shape
        self.shape = GraphShape(
            int(capacity), int(dim), np.dtype(_ORT_DTYPES[inputs["candidates"].type])
        )
        self.chunk = check_chunk(chunk)

    @contextmanager
    def _bound(
        self, query: np.ndarray, query_count: int, threshold: np.float32
    ) -> Iterator[RunChunk]:
        import onnxruntime as ort

        binding = self._session.io_binding()
        # The query's tokens live on the provider's device for all its chunks.
        query_value = ort.OrtValue.ortvalue_from_numpy(query, self._device, 0)
        binding.bind_ortvalue_input("query", query_value)
        binding.bind_cpu_input("query_count", np.array([query_count], np.int32))
        binding.bind_cpu_input("threshold", np.array([threshold], np.float32))

        def run(tokens: np.ndarray, counts: np.ndarray) -> np.ndarray:
            binding.bind_cpu_input("candidates", tokens)
            binding.bind_cpu_input("candidate_counts", counts)
            binding.bind_output(OUTPUT, "cpu")
            self._session.run_with_iobinding(binding)
            return np.asarray(binding.copy_outputs_to_cpu()[0])

        yield run


def bundle_reranker(bundle: Bundle, chunk: int = DEFAULT_CHUNK) -> OnnxReranker:
    """The session of a bundle's rerank.onnx, opened once per file version and process."""
    spec = bundle.rerank_graph()
    return _cached(str(bundle.path(GRAPH_NAME).resolve()), spec.sha256, chunk)


def adhoc_reranker(max_tokens: int, dim: int, chunk: int = DEFAULT_CHUNK) -> OnnxReranker:
    """A session of the graph built in memory (no bundle at hand), for sets of up to
    ``max_tokens`` tokens; needs the onnx package to build it."""
    capacity = max(1, -(-max_tokens // ADHOC_ROUNDING)) * ADHOC_ROUNDING
    return _cached_adhoc(capacity, dim, chunk)


@lru_cache(maxsize=4)
def _cached(path: str, sha256: str, chunk: int) -> OnnxReranker:
    return OnnxReranker(Path(path), chunk=chunk)


@lru_cache(maxsize=4)
def _cached_adhoc(capacity: int, dim: int, chunk: int) -> OnnxReranker:
    try:
        from fol_infer.rerank.graph import build_rerank_model

        model = build_rerank_model(capacity, dim)
    except ModuleNotFoundError as exc:
        raise BackendUnavailableError(
            f"the onnx re-ranker without a bundle builds its graph with the onnx package "
            f"({exc}): pip install onnx, or pass the bundle (its rerank.onnx)"
        ) from None
    return OnnxReranker(model.SerializeToString(), chunk=chunk)
