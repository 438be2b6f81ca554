"""The TensorRT backend: a bundle's engines on one CUDA stream, outputs optionally left on the GPU.

Device memory comes from `fol_infer.trt.memory` (cuda-python, else torch's CUDA). Buffers
are allocated once for the engines' largest batch: pinned host buffers for the copies, and
device buffers shared by tensor name, so the local engine reads the global engine's features
and region scores where they were written. An optional CUDA graph replays the enqueues of each batch
size. `encode_device` skips the copies back and hands out `DeviceArray`s
(``__cuda_array_interface__``: torch.as_tensor, CuPy and Numba read them without a copy) for
the GPU re-ranker and GPU FAISS. Every TensorRT call goes through `fol_infer.trt.run`.
Not yet run on hardware.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fol_infer.backends.base import Encoder, EncoderOutput, GlobalOutput, LocalOutput
from fol_infer.bundle import Bundle
from fol_infer.choices import DeviceMemory, Precision
from fol_infer.errors import BundleError
from fol_infer.trt.library import require_tensorrt
from fol_infer.trt.memory import GraphCaptureFailed, log, open_memory
from fol_infer.trt.record import (
    check_batch,
    check_record,
    current_gpu,
    read_records,
    rebuild_command,
)
from fol_infer.trt.run import EngineSession, TensorInfo

FIELDS = {
    "global": "descriptors",
    "count": "counts",
}  # output name -> dataclass field, if not equal


@dataclass(frozen=True)
class DeviceArray:
    """A tensor in GPU memory owned by the encoder; valid until its next call or `close`.

    Shapes and dtypes are the engine's (the count is int32 here, int64 in `LocalOutput`).
    """

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    stream: int  # consumers synchronize with this stream before reading

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "typestr": self.dtype.str,
            "data": (self.ptr, False),
            "strides": None,
            "version": 3,
            "stream": self.stream or None,
        }


@dataclass
class _Buffer:
    tensor: TensorInfo
    device: int
    host: np.ndarray  # pinned bytes

    def nbytes(self, batch: int) -> int:
        return batch * math.prod(self.tensor.shape[1:]) * self.tensor.dtype.itemsize

    def host_view(self, batch: int) -> np.ndarray:
        view = self.host[: self.nbytes(batch)].view(self.tensor.dtype)
        return view.reshape((batch, *self.tensor.shape[1:]))


class TrtEncoder(Encoder):
    """The bundle's TensorRT engines on an NVIDIA GPU, fp16 or fp32 as they were built; the
    local engine reads the global one's outputs where they lie on the GPU."""

    name = "trt"

    def __init__(
        self,
        bundle: Bundle,
        device: int = 0,
        cuda_graph: bool = False,
        memory: DeviceMemory = "auto",
    ) -> None:
        version = require_tensorrt()
        gpu = current_gpu(device)
        self.bundle = bundle
        self.resolution = bundle.resolution
        self.records = read_records(bundle)
        for record in self.records.values():
            check_record(bundle, record, version, gpu)
        self.precision = Precision(self.records["global"].precision)
        self.max_batch = min(r.profile.max for r in self.records.values())
        self.cuda_graph = cuda_graph
        self._mem = open_memory(memory, device)
        self._sessions: dict[str, EngineSession] = {}
        self._buffers: dict[str, _Buffer] = {}
        self._graphs: dict[tuple[int, tuple[str, ...]], object] = {}
        self._batch: dict[str, int] = {}
        try:
            for graph, record in self.records.items():
                path = bundle.folder / record.file
                session = EngineSession(
                    path.read_bytes(), path, rebuild_command(bundle.folder, record)
                )
                self._sessions[graph] = session
                for tensor in session.tensors:
                    session.bind(tensor.name, self._buffer(tensor).device)
        except BaseException:
            self.close()
            raise

    def _buffer(self, tensor: TensorInfo) -> _Buffer:
        """One buffer per tensor name: a global output is the local input of the same name."""
        known = self._buffers.get(tensor.name)
        if known is None:
            nbytes = self.max_batch * math.prod(tensor.shape[1:]) * tensor.dtype.itemsize
            known = _Buffer(tensor, self._mem.device(nbytes), self._mem.pinned(nbytes))
            self._buffers[tensor.name] = known
        elif (known.tensor.dtype, known.tensor.shape[1:]) != (tensor.dtype, tensor.shape[1:]):
            raise BundleError(f"the engines disagree on tensor {tensor.name!r}: rebuild them")
        return known

    def _upload(self, arrays: dict[str, np.ndarray]) -> None:
        self._mem.sync()  # an earlier encode_device may still be reading the pinned inputs
        for name, array in arrays.items():
            buf = self._buffers[name]
            np.copyto(buf.host_view(len(array)), array, casting="same_kind")
            self._mem.h2d(buf.device, buf.host, buf.nbytes(len(array)))

    def _download(self, names: list[str], batch: int) -> dict[str, np.ndarray]:
        for name in names:
            buf = self._buffers[name]
            self._mem.d2h(buf.host, buf.device, buf.nbytes(batch))
        self._mem.sync()
        return {name: self._buffers[name].host_view(batch).copy() for name in names}

    def _run(self, graphs: tuple[str, ...], batch: int) -> None:
        for graph in graphs:
            check_batch(batch, self.records[graph], self.bundle.folder)
            if self._batch.get(graph) != batch:
                self._sessions[graph].set_batch(batch)
                self._batch[graph] = batch

        def enqueue() -> None:
            for graph in graphs:
                self._sessions[graph].enqueue(self._mem.stream)

        if not self.cuda_graph:
            enqueue()
            return
        key = (batch, graphs)
        if key not in self._graphs:
            enqueue()  # TensorRT applies shape changes on the first enqueue, outside capture
            self._mem.sync()  # the warm-up has finished before the capture starts (trtexec)
            try:
                self._graphs[key] = self._mem.capture(enqueue)
            except GraphCaptureFailed as exc:  # the warm-up's results stand for this call
                log.warning("CUDA graph capture failed (%s): running without CUDA graphs", exc)
                self.cuda_graph = False
                return
        self._mem.launch(self._graphs[key])

    def _outputs(self, graph: str) -> list[str]:
        return [t.name for t in self._sessions[graph].tensors if not t.is_input]

    def _inputs(self, graph: str) -> list[str]:
        return [t.name for t in self._sessions[graph].tensors if t.is_input]

    @staticmethod
    def _fields(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {FIELDS.get(name, name): a for name, a in arrays.items()}

    def _local_output(self, arrays: dict[str, np.ndarray]) -> LocalOutput:
        fields = self._fields(arrays)
        fields["counts"] = fields["counts"].astype(np.int64)
        return LocalOutput(**fields)

    def _encode_global_impl(self, images: np.ndarray) -> GlobalOutput:
        return self._encode_impl(images, local=False).global_

    def _encode_local_impl(self, global_out: GlobalOutput) -> LocalOutput:
        arrays = {n: getattr(global_out, FIELDS.get(n, n)) for n in self._inputs("local")}
        batch = len(next(iter(arrays.values())))
        self._upload(arrays)
        self._run(("local",), batch)
        return self._local_output(self._download(self._outputs("local"), batch))

    def _encode_impl(self, images: np.ndarray, local: bool) -> EncoderOutput:
        """Both branches in one pass: the local engine reads the global one's GPU outputs."""
        graphs = ("global", "local") if local else ("global",)
        self._upload({self._inputs("global")[0]: images})
        self._run(graphs, len(images))
        host = self._download([n for g in graphs for n in self._outputs(g)], len(images))
        g = GlobalOutput(**self._fields({n: host[n] for n in self._outputs("global")}))
        return EncoderOutput(
            g, self._local_output({n: host[n] for n in self._outputs("local")}) if local else None
        )

    def encode_device(self, images: np.ndarray, local: bool = True) -> dict[str, DeviceArray]:
        """Run on the GPU and leave every output there (no copy back, no synchronisation)."""
        images = self.check_images(images)
        graphs = ("global", "local") if local else ("global",)
        self._upload({self._inputs("global")[0]: images})
        self._run(graphs, len(images))
        out = {}
        for name in (n for g in graphs for n in self._outputs(g)):
            t = self._buffers[name].tensor
            out[name] = DeviceArray(
                self._buffers[name].device, (len(images), *t.shape[1:]), t.dtype, self._mem.stream
            )
        return out

    def synchronize(self) -> None:
        """Wait for the encoder's stream: `encode_device` results are complete after this."""
        self._mem.sync()

    def close(self) -> None:
        """Wait for the stream, then release: freeing what a queued run uses is undefined."""
        mem = getattr(self, "_mem", None)
        try:
            if mem is not None:
                mem.sync()
        finally:
            for session in self._sessions.values():
                session.close()
            self._sessions.clear()
            self._graphs.clear()
            self._buffers.clear()
            if mem is not None:
                del self._mem
                mem.close()
