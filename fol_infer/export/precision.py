"""Which ONNX nodes must stay fp32 in an fp16 engine, and the pass that writes that into a graph.

TensorRT 10 gets the plan as per-layer precision constraints. TensorRT 11 has no weak typing
left, so the same plan is written into the graph instead ("AutoCast"-style): every other float
node computes in fp16, Casts sit at the borders of the fp32 islands, graph inputs and outputs
keep their types, and the engine is built strongly typed. Pure onnx: the converted graph runs in
onnxruntime on a CPU, which is how its error is measured without a GPU.

The plan is found from op types and graph structure only (exporter node names change between
torch versions; the names used are those of the very file that is built):

1. Sensitive ops stay fp32: reductions, exp/log and rankings (the Sinkhorn log-sum-exps, the
   L2 norms, the 0/1 count over up to 19,881 cells, the TopKs whose position keys reach 19,881
   while fp16 holds integers exactly only up to 2048), plus LayerNorm and softmax.
2. A node on a data path from a reduction/exp/log/ranking op to any sensitive op stays fp32:
   that covers whole Sinkhorn iterations, the Clip/Div of each L2 normalisation, the confidence
   clamp and the gathers between the local branch's rankings, without naming any of them.
3. A node that reads a constant fp16 cannot hold (above 65504, or an integer above 2048) stays fp32.
4. A cheap node whose float inputs all come from fp32 nodes (or the graph inputs) stays fp32,
   so islands end at the next matmul/convolution instead of bouncing through fp16.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT / FLOAT16

# Ops from which a sensitive fp32 chain starts (rule 1 and the sources of rule 2).
CHAIN_OPS = frozenset(
    """ArgMax ArgMin CumSum Exp Log ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
    ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare TopK""".split()
)
# Ops kept fp32 on their own: they end a chain (rule 2) but do not start one, so the residual
# stream between two LayerNorms stays fp16.
POINT_OPS = frozenset(
    "GroupNormalization InstanceNormalization LayerNormalization LogSoftmax Softmax".split()
)
# Where rule 4 stops: the ops fp16 is for.
HEAVY_OPS = frozenset("Conv ConvTranspose Einsum Gemm MatMul".split())
# Inputs of these are read for their shape only: not a data path.
SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})
# Output types set by an attribute: left exactly as exported; consumers cast what they need.
TYPE_FIXED_OPS = frozenset({"Cast", "Constant", "ConstantOfShape", "EyeLike"})

FP16_MAX = 65504.0
FP16_EXACT_INT = 2048


@dataclass(frozen=True)
class PrecisionPlan:
    """The float-computing nodes of one graph, split into those pinned fp32 and the rest."""

    fp32: dict[str, str]  # node name -> why it stays fp32
    fp16: tuple[str, ...]  # nodes free to compute in fp16
    op_types: dict[str, str]  # node name -> op type, for summaries
    outputs: dict[str, tuple[str, ...]]  # node name -> its output tensors (to find its layers)

    def by_op(self) -> dict[str, dict[str, int]]:
        """{op: {"fp32": n, "fp16": m}}: what a reader checks first."""
        fp32 = Counter(self.op_types[n] for n in self.fp32)
        fp16 = Counter(self.op_types[n] for n in self.fp16)
        return {op: {"fp32": fp32[op], "fp16": fp16[op]} for op in sorted(set(fp32) | set(fp16))}

    def to_dict(self) -> dict[str, Any]:
        return {"fp32_nodes": len(self.fp32), "fp16_nodes": len(self.fp16), "by_op": self.by_op()}


def _is_float(elem_type: int | None) -> bool:
    return elem_type in (FLOAT, FLOAT16)


def _constants(model: Any) -> dict[str, Any]:
    """Initializers and Constant-node outputs (TensorProto), by tensor name."""
    found: dict[str, Any] = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            found[node.output[0]] = node.attribute[0].t
    return found


def tensor_types(model: Any) -> dict[str, int]:
    """Element type of every tensor, running onnx type inference when the file lacks some."""
    import onnx

    def collect(m: Any) -> dict[str, int]:
        g = m.graph
        types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
        types.update({name: t.data_type for name, t in _constants(m).items()})
        return types

    types = collect(model)
    if all(out in types for node in model.graph.node for out in node.output if out):
        return types
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    for init in bare.graph.initializer:  # types only: drop the weights (protobuf's 2 GiB limit)
        init.ClearField("raw_data")
    inferred = onnx.shape_inference.infer_shapes(bare, strict_mode=False)
    types.update(collect(inferred))
    missing = [
        (n.name, n.op_type, o) for n in model.graph.node for o in n.output if o and o not in types
    ]
    if missing:
        name, op, out = missing[0]
        raise ValueError(f"no element type for {out!r}, output of node {name!r} ({op})")
    return types


def _fp16_cannot_hold(tensor: Any) -> bool:
    from onnx import numpy_helper

    values = np.asarray(numpy_helper.to_array(tensor), dtype=np.float64)
    if values.size == 0:
        return False
    if np.abs(values).max() > FP16_MAX:
        return True
    integral = values == np.round(values)
    return bool(np.any(integral & (np.abs(values) > FP16_EXACT_INT)))


def _reach(starts: Iterable[int], edges: dict[int, set[int]]) -> set[int]:
    seen = set(starts)
    queue = deque(seen)
    while queue:
        for nxt in edges.get(queue.popleft(), ()):
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return seen


def plan_precision(model: Any) -> PrecisionPlan:
    """Apply the module's four rules to one ONNX model (loaded with its weights)."""
    graph = model.graph
    nodes = list(graph.node)
    names = [n.name for n in nodes]
    if "" in names or len(set(names)) != len(names):
        i = (
            names.index("")
            if "" in names
            else next(i for i, n in enumerate(names) if names.count(n) > 1)
        )
        raise ValueError(f"node #{i} ({nodes[i].op_type}) has an empty or repeated name: re-export")
    types = tensor_types(model)
    constants = _constants(model)
    producer = {out: i for i, n in enumerate(nodes) for out in n.output if out}

    def data_inputs(n: Any) -> list[str]:
        return [] if n.op_type in SHAPE_ONLY_OPS else [t for t in n.input if t]

    downstream: dict[int, set[int]] = {}
    upstream: dict[int, set[int]] = {}
    for j, n in enumerate(nodes):
        for t in data_inputs(n):
            if t in producer:
                downstream.setdefault(producer[t], set()).add(j)
                upstream.setdefault(j, set()).add(producer[t])

    def computes_float(n: Any) -> bool:
        if n.op_type in TYPE_FIXED_OPS or n.op_type in SHAPE_ONLY_OPS:
            return False
        return any(_is_float(types.get(t)) for t in (*data_inputs(n), *n.output) if t)

    floating = [i for i, n in enumerate(nodes) if computes_float(n)]
    reasons: dict[int, str] = {}
    for i in floating:  # rule 1
        if nodes[i].op_type in CHAIN_OPS or nodes[i].op_type in POINT_OPS:
            reasons[i] = "sensitive op"
    sources = [i for i in reasons if nodes[i].op_type in CHAIN_OPS]
    between = _reach(sources, downstream) & _reach(list(reasons), upstream)
    for i in floating:
        if i in reasons:
            continue
        if i in between:  # rule 2
            reasons[i] = "between sensitive ops"
        elif any(
            t in constants and types[t] == FLOAT and _fp16_cannot_hold(constants[t])
            for t in nodes[i].input
        ):
            reasons[i] = "constant not exact in fp16"  # rule 3
    fp32_tensors = {v.name for v in graph.input if _is_float(v.type.tensor_type.elem_type)}
    for i, n in enumerate(nodes):  # rule 4, in topological order
        if i in floating and i not in reasons and n.op_type not in HEAVY_OPS:
            live = [t for t in data_inputs(n) if _is_float(types.get(t)) and t not in constants]
            if live and all(t in fp32_tensors for t in live):
                reasons[i] = "fp32 inputs"
        if i in reasons or n.op_type in TYPE_FIXED_OPS:
            fp32_tensors.update(t for t in n.output if _is_float(types.get(t)))
    return PrecisionPlan(
        fp32={names[i]: reasons[i] for i in sorted(reasons)},
        fp16=tuple(names[i] for i in floating if i not in reasons),
        op_types={names[i]: nodes[i].op_type for i in floating},
        outputs={names[i]: tuple(nodes[i].output) for i in floating},
    )


def plan_file(path: str | Path) -> PrecisionPlan:
    import onnx

    return plan_precision(onnx.load(str(path)))


def convert_to_mixed(model: Any, plan: PrecisionPlan) -> Any:
    """A copy of `model` computing the plan's fp16 nodes in fp16, with explicit Casts.

    Graph inputs and outputs keep their types; initializers read only in fp16 are stored fp16.
    """
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    types = tensor_types(model)
    inits = {t.name: t for t in graph.initializer}
    fp16_nodes = set(plan.fp16)
    nodes: list[Any] = []
    made: dict[tuple[str, int], str] = {}

    def as_type(name: str, to: int) -> str:
        if types[name] == to:
            return name
        if (name, to) not in made:
            new = f"{name}__{'fp16' if to == FLOAT16 else 'fp32'}"
            if name in inits:
                value = numpy_helper.to_array(inits[name])
                dtype = np.float16 if to == FLOAT16 else np.float32
                graph.initializer.append(numpy_helper.from_array(value.astype(dtype), new))
            else:
                nodes.append(helper.make_node("Cast", [name], [new], name=f"{new}__cast", to=to))
            types[new] = to
            made[(name, to)] = new
        return made[(name, to)]

    for node in graph.node:
        to = FLOAT if node.name in plan.fp32 else FLOAT16 if node.name in fp16_nodes else None
        if to is not None:
            for k, t in enumerate(node.input):
                if t and _is_float(types.get(t)) and node.op_type not in SHAPE_ONLY_OPS:
                    node.input[k] = as_type(t, to)
            for t in node.output:
                if t and _is_float(types.get(t)):
                    types[t] = to
        nodes.append(node)
    for value in graph.output:  # outputs keep their declared type: rename, then cast back
        declared = value.type.tensor_type.elem_type
        if types[value.name] != declared:
            inner = f"{value.name}__{'fp16' if types[value.name] == FLOAT16 else 'fp32'}"
            for node in nodes:
                node.output[:] = [inner if t == value.name else t for t in node.output]
                node.input[:] = [inner if t == value.name else t for t in node.input]
            nodes.append(
                helper.make_node("Cast", [inner], [value.name], name=f"{inner}__out", to=declared)
            )
    del graph.node[:]
    graph.node.extend(nodes)
    used = {t for n in nodes for t in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for value in graph.value_info:
        if _is_float(value.type.tensor_type.elem_type) and value.name in types:
            value.type.tensor_type.elem_type = types[value.name]
    out.metadata_props.add(key="fol_infer.precision", value=f"fp16, {len(plan.fp32)} nodes fp32")
    return out


def write_mixed(src: str | Path, dst: str | Path) -> PrecisionPlan:
    """Plan and convert one graph file; large graphs keep their weights as external data."""
    import onnx

    model = onnx.load(str(src))
    plan = plan_precision(model)
    mixed = convert_to_mixed(model, plan)
    big = sum(t.ByteSize() for t in mixed.graph.initializer) > 1_800_000_000
    onnx.save(mixed, str(dst), save_as_external_data=big)
    onnx.checker.check_model(str(dst))
    return plan


def mixed_parity(bundle: Any, images: np.ndarray | None = None) -> Any:
    """Mixed-precision graphs vs the bundle's fp32 graphs, both in onnxruntime on the CPU.

    Returns a `fol_infer.parity.ParityReport` with the fp16 tolerances, on `images` (default:
    the bundle's reference images). onnxruntime's CPU kernels compute fp16 nodes in fp32
    between fp16 tensors, so this measures fp16 storage and the plan's Casts, not TensorRT's
    kernels.
    """
    import tempfile

    from fol_infer.backends.onnx import OnnxEncoder
    from fol_infer.bundle import Bundle
    from fol_infer.parity import compare, load_reference

    if images is None:
        images = load_reference(bundle)["images"]
    cpu = ["CPUExecutionProvider"]
    with OnnxEncoder(bundle, providers=cpu) as encoder:
        base = encoder.encode(images)
    assert base.local is not None
    names = {"descriptors": "global", "counts": "count"}  # field -> reference.npz name
    fields = {**vars(base.global_), **vars(base.local)}
    reference = {names.get(field, field): array for field, array in fields.items()}
    with tempfile.TemporaryDirectory() as tmp:
        mixed = Bundle(folder=Path(tmp), manifest=bundle.manifest)
        for name in bundle.manifest.graphs:
            write_mixed(bundle.path(name), mixed.path(name))
        with OnnxEncoder(mixed, providers=cpu) as encoder:
            return compare(reference, encoder.encode(images), "fp16")
