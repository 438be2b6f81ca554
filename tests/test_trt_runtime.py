"""The TensorRT path's CUDA and builder handling, on fakes of the APIs it calls.

What cannot run here (cuda-python, TensorRT) is replaced by fakes that answer as the real calls
are documented to: cuda-python's runtime returns `(error, value)` tuples and reports an
invalidated capture as `cudaErrorStreamCaptureInvalidated` from `cudaStreamEndCapture`;
TensorRT refuses a timing cache from another version or GPU with `create_timing_cache`
returning None or `set_timing_cache` returning False.
"""

from __future__ import annotations

import enum
import logging
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from fol_infer.backends import trt
from fol_infer.backends.trt import TrtEncoder
from fol_infer.errors import EngineError
from fol_infer.trt import build as trt_build
from fol_infer.trt import library as trt_library
from fol_infer.trt import memory as trt_memory
from fol_infer.trt.memory import GraphCaptureFailed, _CudaPython

# --- cuda-bindings 13: the native handle instead of int() ----------------------------------


class Handle:
    def __int__(self) -> int:
        return 0xABC


def test_native_handle_uses_the_cuda_bindings_helper_where_it_exists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "cuda.bindings.utils", None)  # before 12.9.1: int()
    assert trt_memory.native_handle(Handle()) == 0xABC
    cuda, bindings, utils = ModuleType("cuda"), ModuleType("cuda.bindings"), ModuleType("u")
    utils.get_cuda_native_handle = lambda obj: 0x5EED  # type: ignore[attr-defined]
    bindings.utils = utils  # type: ignore[attr-defined]
    cuda.bindings = bindings  # type: ignore[attr-defined]
    for name, module in (
        ("cuda", cuda),
        ("cuda.bindings", bindings),
        ("cuda.bindings.utils", utils),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    assert trt_memory.native_handle(Handle()) == 0x5EED


# --- CUDA graph capture, as trtexec does it ---------------------------------------------------

SUCCESS, INVALIDATED = 0, 901


class FakeRuntime:
    """cuda.bindings.runtime's few capture calls, recording what was called."""

    cudaError_t = SimpleNamespace(  # noqa: N815 (cuda-python's names)
        cudaSuccess=SUCCESS, cudaErrorStreamCaptureInvalidated=INVALIDATED
    )
    cudaStreamCaptureMode = SimpleNamespace(cudaStreamCaptureModeThreadLocal=1)  # noqa: N815

    def __init__(self, end: int = SUCCESS, end_raises: bool = False) -> None:
        self.end, self.end_raises, self.calls = end, end_raises, []  # type: ignore[var-annotated]

    def cudaStreamBeginCapture(self, stream: int, mode: int) -> tuple[int]:  # noqa: N802
        self.calls.append("begin")
        return (SUCCESS,)

    def cudaStreamEndCapture(self, stream: int) -> tuple[int, str | None]:  # noqa: N802
        self.calls.append("end")
        if self.end_raises:
            raise RuntimeError("cleanup failed too")
        return self.end, None if self.end == INVALIDATED else "graph"

    def cudaGraphInstantiate(self, graph: str, flags: int) -> tuple[int, str]:  # noqa: N802
        return SUCCESS, f"exec of {graph}"

    def cudaGraphDestroy(self, graph: str) -> tuple[int]:  # noqa: N802
        self.calls.append("destroy")
        return (SUCCESS,)

    def cudaGetLastError(self) -> tuple[int]:  # noqa: N802
        self.calls.append("clear")
        return (SUCCESS,)

    def cudaGetErrorName(self, err: int) -> tuple[int, bytes]:  # noqa: N802
        return SUCCESS, b"cudaErrorUnknown"


def cuda_python(rt: FakeRuntime) -> _CudaPython:
    mem = object.__new__(_CudaPython)
    mem._rt, mem.stream, mem._graphs = rt, 7, []
    return mem


def test_capture_makes_a_graph_when_the_enqueue_is_capturable() -> None:
    rt = FakeRuntime()
    mem = cuda_python(rt)
    assert mem.capture(lambda: None) == "exec of graph"
    assert rt.calls == ["begin", "end"] and mem._graphs == [("exec of graph", "graph")]


def test_an_invalidated_capture_means_no_graph() -> None:
    rt = FakeRuntime(end=INVALIDATED)
    with pytest.raises(GraphCaptureFailed, match="invalidated"):
        cuda_python(rt).capture(lambda: None)
    assert rt.calls == ["begin", "end", "clear"]  # the error is cleared, nothing to destroy


def test_a_failed_enqueue_ends_the_capture_and_destroys_its_graph() -> None:
    rt = FakeRuntime()

    def enqueue() -> None:
        raise EngineError("TensorRT failed to run global.fp16.engine")

    with pytest.raises(GraphCaptureFailed, match="failed to run global"):
        cuda_python(rt).capture(enqueue)
    assert rt.calls == ["begin", "end", "destroy", "clear"]


def test_the_cleanup_error_never_hides_the_real_one() -> None:
    rt = FakeRuntime(end_raises=True)

    class Interrupted(BaseException):
        pass

    def enqueue() -> None:
        raise Interrupted

    with pytest.raises(Interrupted):
        cuda_python(rt).capture(enqueue)
    with pytest.raises(GraphCaptureFailed, match="no way to run"):
        cuda_python(rt).capture(lambda: (_ for _ in ()).throw(EngineError("no way to run")))


class FakeMemory:
    def __init__(self, capture_fails: bool = False, sync_fails: bool = False) -> None:
        self.stream, self.events = 5, []  # type: ignore[var-annotated]
        self.capture_fails, self.sync_fails = capture_fails, sync_fails

    def sync(self) -> None:
        self.events.append("sync")
        if self.sync_fails:
            raise EngineError("CUDA error cudaErrorLaunchFailure")

    def capture(self, enqueue: Any) -> object:
        self.events.append("capture")
        if self.capture_fails:
            raise GraphCaptureFailed("the stream capture was invalidated")
        return "graph"

    def launch(self, graph: object) -> None:
        self.events.append(f"launch {graph}")

    def close(self) -> None:
        self.events.append("memory closed")


class FakeSession:
    def __init__(self, events: list[str]) -> None:
        self.events = events

    def set_batch(self, batch: int) -> None:
        self.events.append(f"batch {batch}")

    def enqueue(self, stream: int) -> None:
        self.events.append("enqueue")

    def close(self) -> None:
        self.events.append("session closed")


def encoder(mem: FakeMemory, monkeypatch: pytest.MonkeyPatch) -> TrtEncoder:
    monkeypatch.setattr(trt, "check_batch", lambda batch, record, folder: None)
    enc = object.__new__(TrtEncoder)
    enc.bundle = SimpleNamespace(folder=Path("b"))  # type: ignore[assignment]
    enc.records = {"global": None}  # type: ignore[dict-item]
    enc._mem, enc.cuda_graph = mem, True  # type: ignore[assignment]
    enc._sessions = {"global": FakeSession(mem.events)}  # type: ignore[dict-item]
    enc._graphs, enc._batch, enc._buffers = {}, {}, {}
    return enc


def test_graphs_replay_per_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    mem = FakeMemory()
    enc = encoder(mem, monkeypatch)
    for batch in (2, 1, 2, 1):
        enc._run(("global",), batch)
    assert mem.events == [
        *("batch 2", "enqueue", "sync", "capture", "launch graph"),  # warm-up, then capture
        *("batch 1", "enqueue", "sync", "capture", "launch graph"),
        *("batch 2", "launch graph", "batch 1", "launch graph"),  # replays only
    ]


def test_a_graph_that_cannot_be_captured_falls_back_once_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    mem = FakeMemory(capture_fails=True)
    enc = encoder(mem, monkeypatch)
    with caplog.at_level(logging.WARNING, logger=trt_memory.__name__):
        for batch in (2, 2, 1):
            enc._run(("global",), batch)
    assert mem.events == [
        *("batch 2", "enqueue", "sync", "capture"),  # the warm-up's results stand
        *("enqueue", "batch 1", "enqueue"),  # no graph from then on
    ]
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "CUDA graph capture failed (the stream capture was invalidated): running without CUDA "
        "graphs"
    ]
    assert not enc.cuda_graph


def test_close_waits_for_the_stream_before_releasing_anything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mem = FakeMemory()
    encoder(mem, monkeypatch).close()
    assert mem.events == ["sync", "session closed", "memory closed"]
    mem = FakeMemory(sync_fails=True)
    enc = encoder(mem, monkeypatch)
    with pytest.raises(EngineError, match="cudaErrorLaunchFailure"):
        enc.close()  # the error is reported, and everything is still released
    assert mem.events == ["sync", "session closed", "memory closed"] and not enc._sessions


# --- the timing cache and the one logger --------------------------------------------------------


class FakeConfig:
    """create_timing_cache: None for bytes TensorRT cannot read; set_timing_cache: False for a
    cache from another version or GPU."""

    def __init__(self, empty_fails: bool = False) -> None:
        self.empty_fails = empty_fails
        self.cache: bytes | None = None

    def create_timing_cache(self, data: bytes) -> SimpleNamespace | None:
        if data == b"unreadable" or (not data and self.empty_fails):
            return None
        return SimpleNamespace(data=data)

    def set_timing_cache(self, cache: SimpleNamespace, ignore_mismatch: bool) -> bool:
        if ignore_mismatch or cache.data == b"other gpu":
            return False
        self.cache = cache.data
        return True


@pytest.mark.parametrize(
    ("old", "why"),
    [
        (b"unreadable", "cannot be read by this TensorRT"),
        (b"other gpu", "was made for another GPU"),
    ],
)
def test_a_timing_cache_from_another_version_or_gpu_is_rebuilt(
    tmp_path: Path, old: bytes, why: str
) -> None:
    path = tmp_path / "timing.cache"
    path.write_bytes(old)
    config = FakeConfig()
    said = trt_build.attach_timing_cache(config, path)  # type: ignore[arg-type]
    assert said == (
        f"timing cache {path} {why} (another TensorRT version, or damaged): starting a new one, "
        "which replaces the file after the build"
    )
    assert config.cache == b"" and path.read_bytes() == old  # replaced only after a build


def test_a_good_or_absent_timing_cache_is_used_silently(tmp_path: Path) -> None:
    path = tmp_path / "timing.cache"
    config = FakeConfig()
    assert trt_build.attach_timing_cache(config, path) is None and config.cache == b""  # type: ignore[arg-type]
    path.write_bytes(b"tactics")
    assert trt_build.attach_timing_cache(config, path) is None and config.cache == b"tactics"  # type: ignore[arg-type]
    assert trt_build.attach_timing_cache(config, None) is None  # type: ignore[arg-type]
    with pytest.raises(EngineError, match="could not create an empty timing cache"):
        trt_build.attach_timing_cache(FakeConfig(empty_fails=True), None)  # type: ignore[arg-type]


class Severity(enum.IntEnum):
    ERROR, WARNING, INFO = 1, 2, 3


class FakeILogger:
    Severity = Severity

    def __init__(self) -> None:
        pass


def test_one_logger_for_every_builder_and_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(ILogger=FakeILogger))
    monkeypatch.setattr(trt_library, "_LOGGER", None)
    first = trt_library.logger()
    assert trt_library.logger() is first
    first.log(Severity.ERROR, "no implementation obeys reformatting-free rules")
    first.log(Severity.INFO, "detail")
    assert first.take() == ["no implementation obeys reformatting-free rules"]
    assert first.take() == []
