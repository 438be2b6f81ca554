"""Building an engine: every TensorRT builder and parser call, in one thin module.

No TensorRT runs on the machines this code is written on, so the calls are gathered in this
package (`build` here, `run` for the runtime), kept few and plain, and type-checked against
the real API (`tensorrt-stubs`, see the tests); all the decisions around them (profiles, the
fp32 plan in `pins`, compatibility in `record`, messages) live in pure code.

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
from typing import TYPE_CHECKING

from fol_infer.errors import BackendUnavailableError, BundleError, EngineError
from fol_infer.files.atomic import atomic_write_bytes
from fol_infer.progress import Progress, silent
from fol_infer.trt.library import logger, major, require_tensorrt
from fol_infer.trt.pins import LayerView, PinReport, TensorView, plan_pins

if TYPE_CHECKING:
    import tensorrt as trt

_MEMORY_WORDS = ("workspace", "insufficient", "out of memory", "memoryallocation")


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
    static_inputs: tuple[str, ...] = ()  # inputs without the batch axis (rerank's query)


@dataclass
class BuildResult:
    engine: bytes
    pins: PinReport | None = None  # TensorRT 10 constraints mode: what was pinned, and why not
    notes: list[str] = field(default_factory=list)  # lines for the user (timing cache, pins)


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
    log = logger()
    log.take()  # this build's errors only, for the message below
    builder = trt.Builder(log)
    flags = 0
    strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # 11: always on
    if options.strongly_typed and not trt11 and strong is not None:
        flags |= 1 << int(strong)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
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
        if name in options.static_inputs:
            profile.set_shape(name, trt.Dims(rest), trt.Dims(rest), trt.Dims(rest))
            continue
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
        raise EngineError(build_failure_message(onnx_path, log.take(), options.workspace_gib))
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    result.engine = bytes(plan)
    return result
