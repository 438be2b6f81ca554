"""TensorRT's build-time calls replaced, so that `build-trt` runs end to end without a GPU."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fol_infer.trt import build as trt_build
from fol_infer.trt import library as trt_library
from fol_infer.trt import record as trt_record
from fol_infer.trt import run as trt_run
from fol_infer.trt.record import GpuInfo

SOME_GPU = GpuInfo("GPU", "9.0", "12.8")


class FakeSession:
    """Stands for a deserialized engine: it loads, and describes no layers."""

    def __init__(self, data: bytes, path: Path, rebuild: str) -> None:
        pass

    def layer_info(self) -> str:
        return '{"Layers": []}'

    def close(self) -> None:
        pass


def fake_build_calls(
    monkeypatch: pytest.MonkeyPatch,
    build: Callable[..., Any],
    tensorrt: str = "10.13.0.35",
    gpu: GpuInfo = SOME_GPU,
) -> None:
    """``build`` replaces `trt_build.build_engine`; TensorRT and the GPU are said to be there."""
    monkeypatch.setattr(trt_library, "require_tensorrt", lambda: tensorrt)
    monkeypatch.setattr(trt_build, "build_engine", build)
    monkeypatch.setattr(trt_run, "EngineSession", FakeSession)
    monkeypatch.setattr(trt_record, "current_gpu", lambda: gpu)
