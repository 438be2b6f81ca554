"""The ``trt`` re-ranker: the bundle's TensorRT rerank engine (``fol-infer build-trt``).

The GPU re-ranker of a Jetson: JetPack always has TensorRT, not torch or triton. Device buffers
are allocated once for the engine's largest chunk; a query's tokens, count and the threshold go
up once per query, then each chunk of float16 candidates is copied into pinned memory, uploaded,
scored and its counts read back on one CUDA stream. The next chunk is packed on a helper thread
while the GPU computes, but its upload waits for the current chunk's compute: one stream
serialises copy and compute (on a Jetson, whose GPU shares the board's memory, the copy is a
memory-to-memory move). Float32 candidates are rounded to float16 on the way, as the index
stores them; scores are then exact for those float16 tokens. Every TensorRT call goes through
`fol_infer.trt.run`; device memory through `fol_infer.trt.memory`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from fol_infer.bundle import Bundle
from fol_infer.choices import DeviceMemory
from fol_infer.errors import BundleError, FolInferError
from fol_infer.rerank.chunks import ChunkedReranker, GraphShape, RunChunk
from fol_infer.rerank.graph import GRAPH_NAME, INPUTS, OUTPUT
from fol_infer.trt.library import require_tensorrt
from fol_infer.trt.memory import open_memory
from fol_infer.trt.record import EngineRecord, check_record, current_gpu, rebuild_command
from fol_infer.trt.run import EngineSession


def rerank_record(bundle: Bundle) -> EngineRecord:
    """The manifest's record of the rerank engine; refused with the command that builds it."""
    bundle.rerank_graph()  # an older bundle: re-export first
    raw = bundle.manifest.engines.get(GRAPH_NAME)
    if raw is None:
        raise BundleError(
            f"bundle {bundle.folder} has no TensorRT rerank engine: build it on this machine "
            f"with fol-infer build-trt {bundle.folder}"
        )
    try:
        return EngineRecord.from_dict(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(
            f"{bundle.folder}/manifest.json has a malformed rerank engine record ({exc!r}): "
            f"rebuild with fol-infer build-trt {bundle.folder}"
        ) from None


class TrtReranker(ChunkedReranker):
    """One deserialized rerank engine, its buffers and stream; one query at a time."""

    def __init__(self, bundle: Bundle, device: int = 0, memory: DeviceMemory = "auto") -> None:
        version = require_tensorrt()
        gpu = current_gpu(device)
        record = rerank_record(bundle)
        check_record(bundle, record, version, gpu)
        path = bundle.folder / record.file
        self._session = EngineSession(
            path.read_bytes(), path, rebuild_command(bundle.folder, record)
        )
        tensors = {t.name: t for t in self._session.tensors}
        capacity, dim = tensors["query"].shape
        self.shape = GraphShape(int(capacity), int(dim), tensors["candidates"].dtype)
        self.chunk = record.profile.max
        self._lock = threading.Lock()  # one execution context: queries take turns
        self._mem = open_memory(memory, device)
        self._device: dict[str, int] = {}
        self._host: dict[str, np.ndarray] = {}
        for name in (*INPUTS, OUTPUT):
            info = tensors[name]
            per_item = int(np.prod([d for d in info.shape if d >= 0])) * info.dtype.itemsize
            nbytes = per_item * (self.chunk if -1 in info.shape else 1)
            self._device[name] = self._mem.device(nbytes)
            self._host[name] = self._mem.pinned(nbytes)
            self._session.bind(name, self._device[name])

    def _upload(self, name: str, array: np.ndarray) -> None:
        host = self._host[name][: array.nbytes]
        host[:] = array.reshape(-1).view(np.uint8)
        self._mem.h2d(self._device[name], host, array.nbytes)

    @contextmanager
    def _bound(
        self, query: np.ndarray, query_count: int, threshold: np.float32
    ) -> Iterator[RunChunk]:
        with self._lock:
            self._upload("query", query)
            self._upload("query_count", np.array([query_count], np.int32))
            self._upload("threshold", np.array([threshold], np.float32))

            def run(tokens: np.ndarray, counts: np.ndarray) -> np.ndarray:
                n = len(tokens)
                self._upload("candidates", tokens)
                self._upload("candidate_counts", counts)
                self._session.set_shape("candidates", tokens.shape)
                self._session.set_shape("candidate_counts", (n,))
                self._session.enqueue(self._mem.stream)
                out = self._host[OUTPUT][: 4 * n]
                self._mem.d2h(out, self._device[OUTPUT], 4 * n)
                self._mem.sync()
                return out.view(np.int32).copy()

            yield run

    def close(self) -> None:
        self._session.close()
        self._mem.close()

    def __enter__(self) -> TrtReranker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def trt_unavailable_reason(bundle: Bundle) -> str | None:
    """Why the bundle's rerank engine cannot run here, or None. Without an engine record (or
    without rerank.onnx) TensorRT is not imported; otherwise the engine is loaded once."""
    if bundle.manifest.rerank is None or "rerank" not in bundle.manifest.engines:
        return "the bundle has no rerank engine (fol-infer build-trt)"
    try:
        bundle_trt_reranker(bundle)
    except FolInferError as exc:
        return str(exc)
    return None


_loaded: dict[tuple[str, str], TrtReranker] = {}
_loading = threading.Lock()


def bundle_trt_reranker(bundle: Bundle) -> TrtReranker:
    """The bundle's rerank engine, loaded once per engine file and process."""
    key = (str(bundle.folder.resolve()), rerank_record(bundle).sha256)
    with _loading:
        if key not in _loaded:
            _loaded[key] = TrtReranker(bundle)
        return _loaded[key]
