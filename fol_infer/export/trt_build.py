"""Every TensorRT call of the project, in one thin module: builder, parser, runtime, inspector.

No TensorRT runs on the machines this code is written on, so the calls are gathered here, kept
few and plain, and type-checked against the real API (`tensorrt-stubs`, see the tests); all the
decisions around them (profiles, the fp32 plan, compatibility, messages) live in pure modules.

Targets TensorRT 10.x (JetPack 6 ships 10.3) and 11.x. TensorRT 11 removed weak typing
(`BuilderFlag.FP16`, `OBEY_PRECISION_CONSTRAINTS`, layer precisions), so there fp16 comes from a
mixed-precision graph (`precision.write_mixed`) built strongly typed; on 10.x the fp32 graph is
built with FP16 allowed and the plan's layers pinned to fp32. Symbols that exist in only one
major version are read with getattr.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fol_infer.errors import BackendUnavailableError, BundleError, EngineError, FolInferError
from fol_infer.export.layer_pins import LayerView, PinReport, TensorView, plan_pins
from fol_infer.fileio import atomic_write_bytes
from fol_infer.progress import Progress, silent

if TYPE_CHECKING:
    import tensorrt as trt

_MEMORY_WORDS = ("workspace", "insufficient", "out of memory", "memoryallocation")
JETSON_RELEASE = Path("/etc/nv_tegra_release")  # present on L4T (JetPack) systems only


def install_hint() -> str:
    """Which package to install here: by the driver's CUDA version, and Jetson apart."""
    from fol_infer.export.engines import current_gpu

    if JETSON_RELEASE.exists():
        return (
            "on Jetson use JetPack's TensorRT (sudo apt install python3-libnvinfer "
            "python3-libnvinfer-dev), not a pip wheel"
        )
    try:
        cuda = current_gpu().cuda_driver
    except FolInferError:
        cuda = ""
    wheels = (
        "pip install tensorrt-cu12 (TensorRT 10.x, CUDA 12.x) or tensorrt-cu13 (TensorRT 10.13+ "
        "and 11.x, CUDA 13.x)"
    )
    if cuda.startswith("12."):
        return f"this driver supports CUDA {cuda}: pip install tensorrt-cu12 (TensorRT 10.x)"
    if cuda.startswith("13."):
        return (
            f"this driver supports CUDA {cuda}: pip install tensorrt-cu13 (TensorRT 10.13+, 11.x)"
        )
    return wheels + (f"; this driver supports CUDA {cuda}" if cuda else "")


def require_tensorrt() -> str:
    """The installed TensorRT version, or a BackendUnavailableError that says what to install."""
    try:
        import tensorrt as trt
    except ModuleNotFoundError:
        trt = None  # type: ignore[assignment]
    except (ImportError, OSError) as exc:  # installed, but its libraries do not load
        raise BackendUnavailableError(f"TensorRT does not load ({exc}): {install_hint()}") from None
    # The type stubs alone install an importable `tensorrt` namespace without the library.
    version = getattr(trt, "__version__", None) if hasattr(trt, "Builder") else None
    if not isinstance(version, str):
        raise BackendUnavailableError(f"TensorRT is not installed: {install_hint()}")
    return version


def major(version: str) -> int:
    return int(version.split(".")[0])


@dataclass(frozen=True)
class ParseProblem:
    node: int  # index in the graph, -1 when the error is not about one node
    node_name: str
    op: str
    desc: str


def parse_failure_message(path: Path, problems: Sequence[ParseProblem]) -> str:
    if not problems:
        return f"TensorRT cannot parse {path} (no detail given): re-export the bundle"
    p = problems[0]
    where = f"node {p.node_name!r} ({p.op}, #{p.node})" if p.node >= 0 else "the model"
    more = f" (and {len(problems) - 1} more errors)" if len(problems) > 1 else ""
    return (
        f"TensorRT cannot parse {path.name} at {where}: {p.desc.strip()}{more}; check the "
        "graph with `fol-infer export`'s TensorRT-readiness report or re-export the bundle"
    )


def build_failure_message(path: Path, log: Sequence[str], workspace_gib: float | None) -> str:
    """One line: TensorRT's last errors and what to change (workspace, batch, log level)."""
    text = " | ".join(line.strip() for line in log[-3:]) or "TensorRT gave no reason"
    if any(w in line.lower() for line in log for w in _MEMORY_WORDS):
        if workspace_gib is not None:
            hint = f"the workspace of {workspace_gib:g} GiB is too small: pass a larger --workspace"
        else:
            hint = "the GPU ran out of memory: free GPU memory or lower --max-batch"
    else:
        hint = "rerun with fol-infer -v build-trt ... for TensorRT's full log"
    return f"TensorRT could not build an engine from {path.name}: {text}; {hint}"


@dataclass(frozen=True)
class BuildOptions:
    precision: str  # "fp32" or "fp16"
    strongly_typed: bool  # the graph carries its own types (mixed-precision ONNX)
    batch: tuple[int, int, int]  # optimisation profile over the batch axis: min, opt, max
    workspace_gib: float | None = None  # None: TensorRT's default (the GPU's memory)
    timing_cache: Path | None = None


@dataclass
class BuildResult:
    engine: bytes
    pins: PinReport | None = None  # TensorRT 10 constraints mode: what was pinned, and why not
    notes: list[str] = field(default_factory=list)  # lines for the user (timing cache, pins)


_LOGGER: Any = None


def _logger() -> Any:
    """The process's one TensorRT logger, shared by every Builder, parser and Runtime.

    A new logger per object is reported to crash TensorRT 10.3 on JetPack 6 (NVIDIA/TensorRT
    #4134), and TensorRT keeps using the first one it was given anyway.

    It keeps warnings and errors for the messages raised here; `take` hands over those seen
    since the last call.
    """
    global _LOGGER
    if _LOGGER is not None:
        return _LOGGER
    import logging

    import tensorrt as trt

    log = logging.getLogger(__name__)

    class Capture(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.lines: list[str] = []

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                self.lines = [*self.lines[-99:], msg]
                log.warning("TensorRT: %s", msg)
            elif log.isEnabledFor(logging.DEBUG):
                log.debug("TensorRT: %s", msg)

        def take(self) -> list[str]:
            lines, self.lines = self.lines, []
            return lines

    _LOGGER = Capture()
    return _LOGGER


def _view(tensor: trt.ITensor) -> TensorView:
    shape = tensor.is_shape_tensor or not tensor.is_execution_tensor
    return TensorView(tensor.name, tensor.dtype.name, shape)


def network_layers(network: trt.INetworkDefinition) -> list[LayerView]:
    """The parsed network as `layer_pins` reads it: names, metadata, tensors and their types."""
    views = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        inputs = [layer.get_input(k) for k in range(layer.num_inputs)]
        views.append(
            LayerView(
                index=i,
                name=layer.name,
                metadata=getattr(layer, "metadata", ""),  # 10.0+: the parser's node names
                kind=layer.type.name,
                inputs=tuple(_view(t) for t in inputs if t is not None),  # optional inputs
                outputs=tuple(_view(layer.get_output(k)) for k in range(layer.num_outputs)),
            )
        )
    return views


def _pin_fp32(network: trt.INetworkDefinition, fp32: Mapping[str, Sequence[str]]) -> PinReport:
    """TensorRT 10: constrain the plan's layers to compute fp32 and emit fp32 where float."""
    import tensorrt as trt

    report = plan_pins(network_layers(network), fp32)
    for pin in report.pins:
        layer = network.get_layer(pin.layer)
        if pin.precision:
            layer.precision = trt.DataType.FLOAT
        for k in pin.float_outputs:
            layer.set_output_type(k, trt.DataType.FLOAT)
    return report


def attach_timing_cache(config: trt.IBuilderConfig, path: Path | None) -> str | None:
    """Give the build a timing cache: `path`'s when it loads, else a new one and the reason.

    A cache from another TensorRT version or GPU is refused either way TensorRT says it:
    `create_timing_cache` returning None, or `set_timing_cache` returning False.
    """
    data = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is not None and config.set_timing_cache(cache, False):
        return None
    why = "cannot be read by this TensorRT" if cache is None else "was made for another GPU"
    empty = config.create_timing_cache(b"") if data else None
    if empty is None or not config.set_timing_cache(empty, False):
        raise EngineError("TensorRT could not create an empty timing cache (see the log with -v)")
    return (
        f"timing cache {path} {why} (another TensorRT version, or damaged): starting a new one, "
        "which replaces the file after the build"
    )


def build_engine(
    onnx_path: Path,
    input_shapes: Mapping[str, Sequence[int]],
    options: BuildOptions,
    fp32_nodes: Mapping[str, Sequence[str]] | None = None,
    progress: Progress | None = None,
) -> BuildResult:
    """Parse one ONNX graph and build a serialized engine with a profile over the batch axis.

    `input_shapes` gives each input's shape without the batch axis; `fp32_nodes` (node name ->
    its outputs) is the precision plan, used only for fp16 builds of an fp32 graph on 10.x.
    """
    version = require_tensorrt()
    import tensorrt as trt

    say = progress or silent
    trt11 = major(version) >= 11
    constraints = options.precision == "fp16" and not options.strongly_typed
    if constraints and trt11:
        raise BackendUnavailableError(
            f"TensorRT {version} has no per-layer precision constraints: build fp16 strongly typed"
        )
    logger = _logger()
    logger.take()  # this build's errors only, for the message below
    builder = trt.Builder(logger)
    flags = 0
    strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # 11: always on
    if options.strongly_typed and not trt11 and strong is not None:
        flags |= 1 << int(strong)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    say(f"parsing {onnx_path.name}")
    if not parser.parse_from_file(str(onnx_path)):
        problems = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            problems.append(ParseProblem(e.node(), e.node_name(), e.node_operator(), e.desc()))
        raise BundleError(parse_failure_message(onnx_path, problems))
    config = builder.create_builder_config()
    if options.workspace_gib is not None:
        config.set_memory_pool_limit(
            trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 2**30)
        )
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None:  # fp32 layers stay true fp32: TF32 matmuls would miss the parity bar
        config.clear_flag(tf32)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer precisions inspectable
    result = BuildResult(engine=b"")
    if constraints:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        result.pins = _pin_fp32(network, fp32_nodes or {})
        result.notes += result.pins.lines(onnx_path.stem)
    low, opt, high = options.batch
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        rest = list(input_shapes[name])
        profile.set_shape(
            name, trt.Dims([low, *rest]), trt.Dims([opt, *rest]), trt.Dims([high, *rest])
        )
    config.add_optimization_profile(profile)
    cache_path = options.timing_cache
    if (why := attach_timing_cache(config, cache_path)) is not None:
        result.notes.append(why)
    say(f"building the {options.precision} engine for {onnx_path.name} (minutes)")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(build_failure_message(onnx_path, logger.take(), options.workspace_gib))
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    result.engine = bytes(plan)
    return result


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

        self._runtime = trt.Runtime(_logger())
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
