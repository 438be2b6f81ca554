"""TensorRT-readiness of ONNX graphs, checked on the CPU (needs only the onnx package).

TensorRT cannot run on machines without an NVIDIA GPU, so every graph property it needs is
checked here instead: ops inside the allowlist below, opset >= 17 (LayerNormalization as one
op), static shapes apart from the batch axis (rerank.onnx: the chunk axis), TopK with a
constant k below TensorRT's limit, no NonZero or other data-dependent shapes, no Resize (the
position embedding is baked), no ReduceLogSumExp (TensorRT computes it without the max shift
and overflows in fp16), and Conv weights as initializers.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

MIN_OPSET = 17
TOPK_MAX_K = 3840  # TensorRT's TopK limit (k < 3840 in TensorRT 10)

# Ops the TensorRT 10 and 11 ONNX parsers both support, minus those this project rules out.
TENSORRT_OPS = frozenset(
    """
    Abs Add And ArgMax ArgMin AveragePool BatchNormalization Cast Ceil Clip Concat Constant
    ConstantOfShape Conv ConvTranspose Cos CumSum DepthToSpace Div Einsum Elu Equal Erf Exp
    Expand Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool
    GlobalMaxPool Greater GreaterOrEqual GroupNormalization HardSigmoid HardSwish Identity
    InstanceNormalization LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax
    MatMul Max MaxPool Mean Min Mul Neg Not Or Pad Pow PRelu ReduceL1 ReduceL2 ReduceMax
    ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape ScatterElements
    ScatterND Shape Sigmoid Sign Sin Slice Softmax Softplus Split Sqrt Squeeze Sub Sum Tanh
    Tile TopK Transpose Trilu Unsqueeze Where
    """.split()
)
# Why each commonly exported op is refused (for the error message).
REFUSED_WHY = {
    "NonZero": "data-dependent output shape",
    "Resize": "the position embedding must be baked (no bicubic Resize)",
    "ReduceLogSumExp": "TensorRT does not max-shift it: use a stable logsumexp",
    "Loop": "dynamic control flow",
    "If": "dynamic control flow",
    "Range": "shape computations must be constant-folded at export",
}


@dataclass
class GraphReport:
    path: Path
    opset: int
    op_counts: Counter[str]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _initializer_value(graph, name: str):
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def check_graph(path: str | Path, batch_axis_name: str = "batch") -> GraphReport:
    """List the ops of one ONNX file and every property TensorRT would reject."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    graph = model.graph
    nodes = list(graph.node)
    for fn in model.functions:  # local functions are inlined by TensorRT's parser
        nodes.extend(fn.node)
    report = GraphReport(path=path, opset=opset, op_counts=Counter(n.op_type for n in nodes))
    if opset < MIN_OPSET:
        report.problems.append(f"opset {opset} < {MIN_OPSET}: LayerNormalization needs >= 17")
    for op in sorted(report.op_counts):
        if op not in TENSORRT_OPS:
            why = REFUSED_WHY.get(op, "not in the TensorRT allowlist")
            report.problems.append(f"op {op} x{report.op_counts[op]}: {why}")
    for node in graph.node:
        if node.op_type == "TopK":
            k = _initializer_value(graph, node.input[1])
            if k is None:
                report.problems.append(f"TopK {node.name}: k is not a constant")
            elif int(k.reshape(-1)[0]) >= TOPK_MAX_K:
                report.problems.append(
                    f"TopK {node.name}: k={int(k.reshape(-1)[0])} >= {TOPK_MAX_K}"
                )
        if (
            node.op_type in ("Conv", "ConvTranspose")
            and _initializer_value(graph, node.input[1]) is None
        ):
            report.problems.append(f"{node.op_type} {node.name}: weights are not an initializer")
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        for axis, dim in enumerate(dims):
            dynamic = bool(dim.dim_param) or not dim.HasField("dim_value")
            if dynamic and not (axis == 0 and dim.dim_param == batch_axis_name):
                report.problems.append(
                    f"{value.name}: axis {axis} is dynamic ({dim.dim_param or '?'}); only the "
                    f"{batch_axis_name} axis may be"
                )
    return report


def check_bundle(folder: str | Path) -> list[GraphReport]:
    """Check every graph a bundle's manifest lists, rerank.onnx (chunk axis) included."""
    from fol_infer.bundle import Bundle
    from fol_infer.rerank.graph import CHUNK_AXIS, GRAPH_NAME

    bundle = Bundle.open(folder)
    reports = [check_graph(bundle.path(name)) for name in bundle.manifest.graphs]
    if bundle.manifest.rerank is not None:
        reports.append(check_graph(bundle.path(GRAPH_NAME), batch_axis_name=CHUNK_AXIS))
    return reports
