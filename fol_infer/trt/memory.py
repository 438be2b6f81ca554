"""Device memory, copies, one CUDA stream and CUDA graphs for the TensorRT backend.

cuda-python's runtime API when it is importable (the Jetson path: no torch there), torch's CUDA
allocator otherwise. Graph capture follows trtexec: a failed enqueue or an invalidated capture
means running without a graph, and ending a failed capture never hides the enqueue's error.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from typing import Any, Protocol, get_args

import numpy as np

from fol_infer.choices import DeviceMemory
from fol_infer.errors import BackendUnavailableError, EngineError, UsageError

MEMORY: tuple[DeviceMemory, ...] = get_args(DeviceMemory)
log = logging.getLogger(__name__)


class GraphCaptureFailed(Exception):
    """The enqueues could not be captured into a CUDA graph: run them without one."""


def native_handle(obj: Any) -> int:
    """The address behind a cuda-python object (`int(obj)` is deprecated from cuda-bindings 13)."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle  # 12.9.1+ and 13.x
    except ImportError:
        return int(obj)
    return int(get_cuda_native_handle(obj))


class GpuMemory(Protocol):
    stream: int

    def device(self, nbytes: int) -> int: ...
    def pinned(self, nbytes: int) -> np.ndarray: ...
    def h2d(self, dst: int, src: np.ndarray, nbytes: int) -> None: ...
    def d2h(self, dst: np.ndarray, src: int, nbytes: int) -> None: ...
    def sync(self) -> None: ...
    def capture(self, enqueue: Callable[[], None]) -> object:
        """A replayable graph of `enqueue`'s work; GraphCaptureFailed when it cannot be made."""
        ...

    def launch(self, graph: object) -> None: ...
    def close(self) -> None: ...


class _CudaPython:
    """cuda-python's runtime API (`cuda.bindings.runtime`, `cuda.cudart` before 12.6)."""

    def __init__(self, device: int) -> None:
        try:
            from cuda.bindings import runtime as rt
        except ImportError:
            from cuda import cudart as rt
        self._rt = rt
        self._call(rt.cudaSetDevice(device))
        self._stream = self._call(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))
        self.stream = native_handle(self._stream)
        self._device: list[int] = []
        self._host: list[int] = []
        self._graphs: list[tuple[Any, Any]] = []

    def _call(self, result: tuple[Any, ...]) -> Any:
        if result[0] != self._rt.cudaError_t.cudaSuccess:
            _, name = self._rt.cudaGetErrorName(result[0])
            raise EngineError(f"CUDA error {name.decode()}: is the GPU out of memory?")
        if len(result) == 1:
            return None
        return result[1] if len(result) == 2 else result[1:]

    def device(self, nbytes: int) -> int:
        ptr = int(self._call(self._rt.cudaMalloc(nbytes)))
        self._device.append(ptr)
        return ptr

    def pinned(self, nbytes: int) -> np.ndarray:
        ptr = int(self._call(self._rt.cudaMallocHost(nbytes)))
        self._host.append(ptr)
        return np.ctypeslib.as_array((ctypes.c_ubyte * nbytes).from_address(ptr))

    def h2d(self, dst: int, src: np.ndarray, nbytes: int) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self._rt.cudaMemcpyAsync(dst, src.ctypes.data, nbytes, kind, self.stream))

    def d2h(self, dst: np.ndarray, src: int, nbytes: int) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self._rt.cudaMemcpyAsync(dst.ctypes.data, src, nbytes, kind, self.stream))

    def sync(self) -> None:
        self._call(self._rt.cudaStreamSynchronize(self.stream))

    def capture(self, enqueue: Callable[[], None]) -> object:
        """As trtexec does: a failed enqueue or an invalidated capture means no graph."""
        rt = self._rt
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._call(rt.cudaStreamBeginCapture(self.stream, mode))
        try:
            enqueue()
        except EngineError as exc:
            self._abandon_capture()
            raise GraphCaptureFailed(str(exc)) from exc
        except BaseException:
            self._abandon_capture()
            raise
        err, graph = rt.cudaStreamEndCapture(self.stream)
        if err == rt.cudaError_t.cudaErrorStreamCaptureInvalidated:
            rt.cudaGetLastError()  # not sticky: clear it so later calls do not report it
            raise GraphCaptureFailed("the stream capture was invalidated")
        self._call((err,))
        try:
            runnable = self._call(rt.cudaGraphInstantiate(graph, 0))
        except BaseException:
            rt.cudaGraphDestroy(graph)
            raise
        self._graphs.append((runnable, graph))
        return runnable

    def _abandon_capture(self) -> None:
        """End a capture whose enqueue failed; an error here never replaces the enqueue's."""
        rt = self._rt
        try:
            err, graph = rt.cudaStreamEndCapture(self.stream)
            if err == rt.cudaError_t.cudaSuccess and graph is not None:
                rt.cudaGraphDestroy(graph)
            rt.cudaGetLastError()
        except Exception as cleanup:  # noqa: BLE001 (the enqueue's error is the one to raise)
            log.debug("ending the failed CUDA graph capture also failed: %s", cleanup)

    def launch(self, graph: object) -> None:
        self._call(self._rt.cudaGraphLaunch(graph, self.stream))

    def close(self) -> None:
        rt = self._rt
        for runnable, graph in self._graphs:
            rt.cudaGraphExecDestroy(runnable)
            rt.cudaGraphDestroy(graph)
        for ptr in self._device:
            rt.cudaFree(ptr)
        for ptr in self._host:
            rt.cudaFreeHost(ptr)
        rt.cudaStreamDestroy(self._stream)
        self._graphs, self._device, self._host = [], [], []


class _TorchCuda:
    """torch's CUDA allocator and streams, where torch is installed and cuda-python is not."""

    def __init__(self, device: int) -> None:
        import torch

        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                "torch sees no CUDA GPU: install cuda-python or a CUDA torch"
            )
        self._torch = torch
        self._dev = torch.device("cuda", device)
        torch.cuda.set_device(self._dev)
        self._stream = torch.cuda.Stream(device=self._dev)
        self.stream = int(self._stream.cuda_stream)
        self._tensors: dict[int, Any] = {}  # address -> owning tensor (device and pinned)
        self._graphs: list[Any] = []

    def device(self, nbytes: int) -> int:
        t = self._torch.empty(nbytes, dtype=self._torch.uint8, device=self._dev)
        self._tensors[t.data_ptr()] = t
        return int(t.data_ptr())

    def pinned(self, nbytes: int) -> np.ndarray:
        t = self._torch.empty(nbytes, dtype=self._torch.uint8, pin_memory=True)
        self._tensors[t.data_ptr()] = t
        return np.asarray(t.numpy())

    def _copy(self, dst: int, src: int, nbytes: int) -> None:
        with self._torch.cuda.stream(self._stream):
            self._tensors[dst][:nbytes].copy_(self._tensors[src][:nbytes], non_blocking=True)

    def h2d(self, dst: int, src: np.ndarray, nbytes: int) -> None:
        self._copy(dst, src.ctypes.data, nbytes)

    def d2h(self, dst: np.ndarray, src: int, nbytes: int) -> None:
        self._copy(dst.ctypes.data, src, nbytes)

    def sync(self) -> None:
        self._stream.synchronize()

    def capture(self, enqueue: Callable[[], None]) -> object:
        graph = self._torch.cuda.CUDAGraph()
        failed: EngineError | None = None
        try:
            with self._torch.cuda.graph(graph, stream=self._stream):
                try:
                    enqueue()
                except EngineError as exc:  # kept apart: ending the capture may raise too
                    failed = exc
        except RuntimeError as exc:  # torch ends the capture: invalidated, or not capturable
            raise GraphCaptureFailed(str(failed or exc)) from (failed or exc)
        if failed is not None:
            raise GraphCaptureFailed(str(failed)) from failed
        self._graphs.append(graph)
        return graph

    def launch(self, graph: object) -> None:
        with self._torch.cuda.stream(self._stream):
            graph.replay()  # type: ignore[attr-defined]

    def close(self) -> None:
        self._graphs.clear()
        self._tensors.clear()


def open_memory(kind: DeviceMemory | str, device: int) -> GpuMemory:
    """cuda-python first (no torch on Jetson), torch's CUDA otherwise."""
    if kind not in MEMORY:
        raise UsageError(f"memory must be one of {', '.join(MEMORY)}, not {kind!r}")
    if kind in ("auto", "cuda-python"):
        try:
            return _CudaPython(device)
        except ImportError:
            if kind == "cuda-python":
                raise BackendUnavailableError(
                    "cuda-python is not installed: pip install cuda-python"
                ) from None
    try:
        return _TorchCuda(device)
    except ImportError:
        raise BackendUnavailableError(
            "the trt backend needs cuda-python (pip install cuda-python, 12.x for CUDA 12 and "
            "13.x for CUDA 13) or a CUDA build of torch for device memory"
        ) from None
