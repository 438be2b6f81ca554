"""Running a built engine: every runtime TensorRT call, in one session object."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fol_infer.errors import BundleError, EngineError
from fol_infer.trt.library import logger, require_tensorrt

if TYPE_CHECKING:
    import tensorrt as trt


@dataclass(frozen=True)
class TensorInfo:
    name: str
    is_input: bool
    dtype: np.dtype[Any]
    shape: tuple[int, ...]  # -1 for the batch axis


def _dims(dims: trt.Dims) -> tuple[int, ...]:
    return tuple(dims[i] for i in range(len(dims)))


def _numpy_dtype(dtype: trt.DataType) -> np.dtype[Any]:
    import tensorrt as trt

    table = {
        trt.DataType.FLOAT: np.float32,
        trt.DataType.HALF: np.float16,
        trt.DataType.INT32: np.int32,
        trt.DataType.INT64: np.int64,
        trt.DataType.INT8: np.int8,
        trt.DataType.UINT8: np.uint8,
        trt.DataType.BOOL: np.bool_,
    }
    return np.dtype(table[dtype])


class EngineSession:
    """One deserialized engine and its execution context: every runtime TensorRT call."""

    def __init__(self, data: bytes, path: Path, rebuild: str) -> None:
        require_tensorrt()
        import tensorrt as trt

        self._runtime = trt.Runtime(logger())
        engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise BundleError(f"TensorRT cannot load engine {path}: rebuild with {rebuild}")
        context = engine.create_execution_context()
        if context is None:
            raise EngineError(f"no execution context for {path}: is the GPU out of memory?")
        self._engine: trt.ICudaEngine | None = engine
        self._context: trt.IExecutionContext | None = context
        self.path = path
        self.tensors: list[TensorInfo] = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            self.tensors.append(
                TensorInfo(
                    name=name,
                    is_input=engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                    dtype=_numpy_dtype(engine.get_tensor_dtype(name)),
                    shape=_dims(engine.get_tensor_shape(name)),
                )
            )

    def _live(self) -> tuple[trt.ICudaEngine, trt.IExecutionContext]:
        if self._engine is None or self._context is None:
            raise RuntimeError(f"engine session for {self.path} was closed")
        return self._engine, self._context

    def set_batch(self, batch: int) -> None:
        _, context = self._live()
        for t in self.tensors:
            if t.is_input and not context.set_input_shape(t.name, (batch, *t.shape[1:])):
                raise EngineError(f"{self.path.name} rejects batch {batch} for input {t.name!r}")

    def set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """One input's shape, for engines whose inputs do not all share the batch axis."""
        _, context = self._live()
        if not context.set_input_shape(name, shape):
            raise EngineError(f"{self.path.name} rejects shape {shape} for input {name!r}")

    def bind(self, name: str, address: int) -> None:
        _, context = self._live()
        if not context.set_tensor_address(name, address):
            raise EngineError(f"{self.path.name} has no tensor {name!r} to bind")

    def enqueue(self, stream: int) -> None:
        """Queue one inference on a CUDA stream (asynchronous: the caller synchronizes)."""
        _, context = self._live()
        if not context.execute_async_v3(stream):
            raise EngineError(f"TensorRT failed to run {self.path.name} (see the log with -v)")

    def layer_info(self, batch: int = 1) -> str:
        """TensorRT's JSON description of the built layers, their precisions included.

        Formats are known for concrete shapes only ("N/A due to dynamic shapes" otherwise), so
        the execution context is inspected with every input at `batch`.
        """
        import tensorrt as trt

        engine, context = self._live()
        self.set_batch(batch)
        inspector = engine.create_engine_inspector()
        inspector.execution_context = context
        return inspector.get_engine_information(trt.LayerInformationFormat.JSON)

    def close(self) -> None:
        self._context = None
        self._engine = None
