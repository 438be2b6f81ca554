"""Every list of choices the toolkit offers, each defined once.

The command line, the library and the error messages all read these lists, so adding a
backend or a token format is a one-line change here. The enums mix in ``str`` (rather than
Python 3.11's ``StrEnum``) because Jetson's JetPack 6 ships Python 3.10; ``__str__`` returns
the value, so members print, format and compare as the plain words users type.
"""

from __future__ import annotations

from enum import Enum
from typing import Literal, TypeVar

from fol_infer.errors import UsageError

C = TypeVar("C", bound="Choice")


class Choice(str, Enum):
    """A word from a fixed list; ``parse`` turns user input into a member or a clear error."""

    def __str__(self) -> str:
        return str(self.value)

    def __hash__(self) -> int:  # as the plain word's (Python 3.10 hashes an Enum by its name)
        return str.__hash__(self)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(str(m.value) for m in cls)

    @classmethod
    def listed(cls) -> str:
        """The values as users type them, comma separated (for messages and help)."""
        return ", ".join(cls.values())

    @classmethod
    def parse(cls: type[C], value: str | C, what: str) -> C:
        """The member named by ``value``; UsageError naming ``what`` and the choices if none."""
        try:
            return cls(value)
        except ValueError:
            raise UsageError(f"unknown {what} {value!r}: choose one of {cls.listed()}") from None


class EncoderBackend(Choice):
    """What runs the FoL graphs: onnxruntime, PyTorch (the reference) or TensorRT engines."""

    ONNX = "onnx"
    TORCH = "torch"
    TRT = "trt"


class TokenFormat(Choice):
    """How an index stores re-ranking tokens (see `fol_infer.index.database`)."""

    FP16 = "fp16"
    INT8 = "int8"
    INT8_EXACT = "int8-exact"


class RerankBackend(Choice):
    """What counts mutual-nearest-neighbour matches; auto = triton on a working GPU, else the
    bundle's TensorRT rerank engine where it loads (Jetson), else cpu. onnx and trt run the
    bundle's rerank.onnx (ONNX Runtime) and its engine."""

    AUTO = "auto"
    CPU = "cpu"
    TRITON = "triton"
    TORCH = "torch"
    ONNX = "onnx"
    TRT = "trt"


class Precision(Choice):
    """Arithmetic of an engine, and the parity tolerances it is held to."""

    FP32 = "fp32"
    FP16 = "fp16"


# Choices that never reach the command line: typed lists for the library's own arguments.
# What opening checks (fol_infer.files.integrity): sizes only; the hashes the verification cache
# cannot vouch for (the default); or every hash, every time.
VerifyLevel = Literal["sizes", "cached", "full"]
FaissDevice = Literal["auto", "cpu", "gpu"]
StoreDtype = Literal["fp32", "fp16", "int8"]  # one token store's row type
IndexMode = Literal["new", "append", "force"]  # how `build_index` treats an existing folder
# How an engine got its precision: plain fp32, TensorRT 10 per-layer constraints on an fp32
# graph, or a strongly typed build of a mixed-precision graph (TensorRT 11, or 10 on request).
EngineBuildMode = Literal["fp32", "constraints", "strongly-typed"]
DeviceMemory = Literal["auto", "cuda-python", "torch"]  # who allocates TensorRT's GPU memory
