"""The fp32 plan as TensorRT 10 receives it: layers, not nodes, on the parser's real layout.

The exported graphs are laid out as onnx-tensorrt's importer lays them out where it matters to
the plan (`ImporterLayout`): ReduceL2 / ReduceSumSquare become an unregistered x·x element-wise
layer (TensorRT's default name, no metadata) feeding the registered reduction; GreaterOrEqual
becomes Greater, Equal and Or layers with bool outputs; weights become constant layers (here
carrying the consuming node's metadata, as the Q/DQ importer registers them: the worst case);
Shape and what computes on its integers are shape tensors; TopK has an integer output; a node
whose inputs are all weights is folded into weights with no layer. `_pin_fp32` then runs on a
fake network and a fake `tensorrt` module built from that layout.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fol_infer.bundle import Bundle
from fol_infer.export import precision
from fol_infer.trt import build as trt_build
from fol_infer.trt import pins as trt_pins
from fol_infer.trt.pins import LayerView, TensorView

onnx = pytest.importorskip("onnx", reason="the precision plan reads ONNX graphs (pip install onnx)")
DTYPES = {1: "FLOAT", 10: "HALF", 9: "BOOL", 7: "INT64", 6: "INT32", 3: "INT8", 2: "UINT8"}
KINDS = {"Shape": "SHAPE", "TopK": "TOPK", "Constant": "CONSTANT", "MatMul": "MATRIX_MULTIPLY"}


class ImporterLayout:
    """One ONNX graph as a list of `LayerView`s, in the order the parser adds them."""

    def __init__(self, model: Any) -> None:
        self.types = precision.tensor_types(model)
        self.weights = {t.name for t in model.graph.initializer}
        self.layers: list[LayerView] = []
        self.made: set[str] = set()  # weights already turned into constant layers
        self.shape: set[str] = set()  # integer tensors computed from a Shape
        self.folded: set[str] = set()  # nodes computed on weights: no layer
        for node in model.graph.node:
            self.import_node(node)

    def dtype(self, name: str) -> str:
        return DTYPES[self.types[name]]

    def view(self, name: str) -> TensorView:
        return TensorView(name, self.dtype(name), name in self.shape)

    def add(self, name: str, meta: str, kind: str, ins: list[str], outs: list[str]) -> None:
        self.layers.append(
            LayerView(
                len(self.layers),
                name,
                meta,
                kind,
                tuple(self.view(t) for t in ins),
                tuple(self.view(t) for t in outs),
            )
        )

    def unnamed(self, kind: str, ins: list[str], dtype: int) -> str:
        name = f"(Unnamed Layer* {len(self.layers)}) [{kind}]"
        self.types[f"{name}_output"] = dtype
        self.add(name, "", kind.upper(), ins, [f"{name}_output"])
        return f"{name}_output"

    def import_node(self, node: Any) -> None:
        if node.op_type == "Constant":
            self.weights.update(node.output)
            return
        ins = [t for t in node.input if t]
        if ins and all(t in self.weights for t in ins):
            self.weights.update(node.output)
            self.folded.add(node.name)
            return
        meta = f"[ONNX Layer: {node.name}]"
        for t in ins:
            if t in self.weights and t not in self.made:
                self.made.add(t)
                self.add(t, meta, "CONSTANT", [], [t])
        if node.op_type == "Shape" or (
            any(t in self.shape for t in ins)
            and not precision._is_float(self.types[node.output[0]])
        ):
            self.shape.update(node.output)
        if node.op_type in ("ReduceL2", "ReduceSumSquare"):
            square = self.unnamed("ElementWise", [ins[0], ins[0]], self.types[ins[0]])
            if node.op_type == "ReduceL2":
                summed = f"{node.name}_sum_output"
                self.types[summed] = self.types[ins[0]]
                self.add(node.name, meta, "REDUCE", [square, *ins[1:]], [summed])
                self.add(f"{node.name}_1", meta, "UNARY", [summed], list(node.output))
            else:
                self.add(node.name, meta, "REDUCE", [square, *ins[1:]], list(node.output))
        elif node.op_type in ("GreaterOrEqual", "LessOrEqual"):
            parts = []
            for k, op in enumerate(("compare", "equal")):
                parts.append(f"{node.name}_{op}_output")
                self.types[parts[-1]] = 9
                self.add(f"{node.name}_{k}" if k else node.name, meta, "ELEMENTWISE", ins, parts)
                parts = parts[-1:] if k == 0 else parts
            self.add(f"{node.name}_2", meta, "ELEMENTWISE", parts, list(node.output))
        else:
            kind = KINDS.get(node.op_type, node.op_type.upper())
            self.add(node.name, meta, kind, ins, [t for t in node.output if t])


def planned(bundle_dir: Path, graph: str) -> tuple[Any, precision.PrecisionPlan, ImporterLayout]:
    model = onnx.load(str(Bundle.open(bundle_dir).path(graph)))
    plan = precision.plan_precision(model)
    return model, plan, ImporterLayout(model)


def fp32_nodes(plan: precision.PrecisionPlan) -> dict[str, tuple[str, ...]]:
    return {n: plan.outputs[n] for n in plan.fp32}


def consumers_of(layout: ImporterLayout, tensor: str) -> list[LayerView]:
    return [layer for layer in layout.layers if tensor in {t.name for t in layer.inputs}]


# --- rule 1: the squares of ReduceL2 --------------------------------------------------------


def test_every_reduce_l2_square_is_pinned_through_its_reduction(tiny_bundle_322: Path) -> None:
    squares = 0
    for graph in ("global", "local"):
        model, plan, layout = planned(tiny_bundle_322, graph)
        fp32 = fp32_nodes(plan)
        report = trt_pins.plan_pins(layout.layers, fp32)
        pinned = {p.layer: p for p in report.pins}
        node_of_output = {out: node for node, outs in fp32.items() for out in outs}
        for layer in layout.layers:
            if not layer.name.startswith(trt_pins.UNNAMED):
                continue
            (reduce,) = consumers_of(layout, layer.outputs[0].name)
            assert reduce.kind == "REDUCE" and reduce.index in pinned
            # by name and metadata alone (the rule before) the square matched no planned node
            outs = [t.name for t in layer.outputs]
            assert not trt_pins.layer_nodes("", layer.name, outs, node_of_output)
            assert pinned[layer.index].float_outputs == (0,)
            assert layer.name in report.via_consumer
            squares += 1
        norms = [n for n in model.graph.node if n.op_type in ("ReduceL2", "ReduceSumSquare")]
        assert len(report.via_consumer) == len(norms) and all(n.name in plan.fp32 for n in norms)
    assert squares == 4  # three L2 normalisations in the global graph, one in the local


def test_an_unregistered_chain_pins_backwards_but_not_past_registered_layers() -> None:
    f = lambda name: TensorView(name, "FLOAT")  # noqa: E731
    layers = [
        LayerView(0, "node_mm", "[ONNX Layer: node_mm]", "MATRIX_MULTIPLY", (f("x"),), (f("a"),)),
        LayerView(1, "(Unnamed Layer* 1) [Shuffle]", "", "SHUFFLE", (f("a"),), (f("b"),)),
        LayerView(2, "(Unnamed Layer* 2) [ElementWise]", "", "ELEMENTWISE", (f("b"),), (f("c"),)),
        LayerView(3, "node_sum", "[ONNX Layer: node_sum]", "REDUCE", (f("c"),), (f("y"),)),
        LayerView(4, "(Unnamed Layer* 4) [ElementWise]", "", "ELEMENTWISE", (f("x"),), (f("z"),)),
        LayerView(
            5, "(Unnamed Layer* 5) [Cast]", "", "CAST", (TensorView("i", "INT32"),), (f("v"),)
        ),
        LayerView(
            6, "node_mul", "[ONNX Layer: node_mul]", "ELEMENTWISE", (f("v"), f("y")), (f("w"),)
        ),
    ]
    report = trt_pins.plan_pins(layers, {"node_sum": ("y",), "node_mul": ("w",)})
    # not the matmul, not the unrelated layer, not the exact cast from integers
    assert [p.layer for p in report.pins] == [1, 2, 3, 6]
    assert report.via_consumer == [
        "(Unnamed Layer* 1) [Shuffle]",
        "(Unnamed Layer* 2) [ElementWise]",
    ]
    report = trt_pins.plan_pins(layers, {"node_sum": ("y",), "node_gone": ("w",)})
    assert report.nodes == {"node_sum": "pinned", "node_gone": "folded"}
    assert report.lines("g")[-1] == (
        "g: 1 planned node without a layer of its own (folded by the parser), e.g. node_gone"
    )


def test_metadata_with_a_local_function_still_names_its_node() -> None:
    meta = "[ONNX Layer: node_norm | Local Function: LayerNorm]\x1f[ONNX Layer: node_exp]"
    assert trt_pins.layer_nodes(meta, "x", [], {}) == {"node_norm", "node_exp"}


# --- rules 2 and 3: comparisons, constants, shape tensors, integer outputs -----------------


def test_comparisons_get_fp32_inputs_and_keep_their_bool_outputs(tiny_bundle_322: Path) -> None:
    seen = set()
    for graph in ("global", "local"):
        model, plan, layout = planned(tiny_bundle_322, graph)
        report = trt_pins.plan_pins(layout.layers, fp32_nodes(plan))
        pinned = {p.layer: p for p in report.pins}
        for node in model.graph.node:
            if node.op_type not in ("Greater", "GreaterOrEqual"):
                continue
            seen.add(node.op_type)
            assert report.nodes[node.name] == trt_pins.COMPARISON
            tag = f"[ONNX Layer: {node.name}]"
            for layer in (layer for layer in layout.layers if layer.metadata == tag):
                floats_in = any(t.dtype == "FLOAT" for t in layer.inputs)
                assert (layer.index in pinned) == floats_in  # the Or of two bools is left alone
                if floats_in:
                    assert pinned[layer.index].float_outputs == ()  # no set_output_type on bool
    assert seen == {"Greater", "GreaterOrEqual"}


def test_constants_shape_tensors_and_integer_outputs_never_get_a_precision(
    tiny_bundle_322: Path,
) -> None:
    for graph in ("global", "local"):
        model, plan, layout = planned(tiny_bundle_322, graph)
        report = trt_pins.plan_pins(layout.layers, fp32_nodes(plan))
        kinds = {"CONSTANT": 0, "shape": 0, "int": 0}
        for pin in report.pins:
            layer = layout.layers[pin.layer]
            assert layer.kind != "CONSTANT" and not any(t.shape for t in layer.outputs)
            floats = {"FLOAT", "HALF"}
            if not all(t.dtype in floats for t in layer.outputs):  # then bool, or TopK's indices
                assert trt_pins.is_comparison(layer) or not pin.precision
        for layer in layout.layers:  # the graphs do have each kind (constants of planned nodes)
            name = trt_pins._ONNX_LAYER.findall(layer.metadata)
            kinds["shape"] += any(t.shape for t in layer.outputs)
            if name and name[0] in plan.fp32:
                kinds["CONSTANT"] += layer.kind == "CONSTANT"
                kinds["int"] += any(t.dtype.startswith("INT") for t in layer.outputs)
        assert all(kinds.values()), kinds
        topks = [n.name for n in model.graph.node if n.op_type == "TopK"]
        assert topks and all(report.nodes[n] == trt_pins.OUTPUTS for n in topks)
        for pin in report.pins:  # the ranked values stay fp32; the precision is TensorRT's
            if layout.layers[pin.layer].kind == "TOPK":
                assert not pin.precision and pin.float_outputs == (0,)


def test_skip_rules_one_layer_at_a_time() -> None:
    f, b, i = (TensorView("f", "FLOAT"), TensorView("b", "BOOL"), TensorView("i", "INT32"))
    shape = TensorView("s", "INT64", shape=True)
    assert trt_pins.skip_reason(LayerView(0, "c", "", "CONSTANT", (), (f,))) == "constant"
    assert trt_pins.skip_reason(LayerView(0, "s", "", "SHAPE", (f,), (shape,))) == "shape tensor"
    assert trt_pins.skip_reason(LayerView(0, "t", "", "TOPK", (f,), (f, i))) == "non-float output"
    assert trt_pins.skip_reason(LayerView(0, "o", "", "ELEMENTWISE", (b, b), (b,))) is not None
    assert trt_pins.skip_reason(LayerView(0, "g", "", "ELEMENTWISE", (f, f), (b,))) is None
    assert trt_pins.skip_reason(LayerView(0, "x", "", "GATHER", (f, i), (f,))) is None


# --- what build-trt says ----------------------------------------------------------------------


def test_report_says_what_happened_to_each_planned_node(tiny_bundle_322: Path) -> None:
    model, plan, layout = planned(tiny_bundle_322, "global")
    report = trt_pins.plan_pins(layout.layers, fp32_nodes(plan))
    assert set(report.nodes) == set(plan.fp32)
    folded = report.count(trt_pins.FOLDED)
    assert set(folded) == layout.folded & set(plan.fp32)  # only nodes with no layer at all
    lines = report.lines("global")
    pinned = len(report.count("pinned")) + len(report.count("comparison"))
    pinned += len(report.count(trt_pins.OUTPUTS))
    assert lines[0] == (
        f"global: {len(report.pins)} layers constrained to fp32 for {pinned} of "
        f"{len(plan.fp32)} planned nodes (1 comparison: fp32 inputs, bool outputs; "
        "1 ranking: fp32 values, precision free)"
    )
    assert lines[1].startswith("global: 3 of them added by the parser without an ONNX node")
    assert len(lines) == 2 and not folded  # nothing skipped or folded in this graph
    record = report.to_dict()
    topk = next(n.name for n in model.graph.node if n.op_type == "TopK")
    assert record["nodes"][topk] == trt_pins.OUTPUTS and len(record["via_consumer"]) == 3
    assert [layer["name"] for layer in record["layers"]] == [p.name for p in report.pins]
    assert [layer["precision"] for layer in record["layers"]].count(False) == 1  # the TopK


# --- _pin_fp32 on a fake network and a fake tensorrt module ---------------------------------


class Named:
    def __init__(self, name: str) -> None:
        self.name = name


class FakeTensor:
    def __init__(self, view: TensorView) -> None:
        self.name = view.name
        self.dtype = Named(view.dtype)
        self.is_shape_tensor = view.shape
        self.is_execution_tensor = not view.shape


class FakeLayer:
    def __init__(self, view: LayerView) -> None:
        self.name, self.metadata, self.type = view.name, view.metadata, Named(view.kind)
        self._inputs = [FakeTensor(t) for t in view.inputs]
        self._outputs = [FakeTensor(t) for t in view.outputs]
        self.num_inputs, self.num_outputs = len(self._inputs), len(self._outputs)
        self.precision: Named | None = None
        self.output_types: dict[int, str] = {}

    def get_input(self, k: int) -> FakeTensor:
        return self._inputs[k]

    def get_output(self, k: int) -> FakeTensor:
        return self._outputs[k]

    def set_output_type(self, k: int, dtype: Named) -> None:
        self.output_types[k] = dtype.name


class FakeNetwork:
    def __init__(self, layers: list[LayerView]) -> None:
        self.layers = [FakeLayer(v) for v in layers]
        self.num_layers = len(self.layers)

    def get_layer(self, i: int) -> FakeLayer:
        return self.layers[i]


def test_pin_fp32_sets_precision_and_float_output_types_only(
    tiny_bundle_322: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_trt = SimpleNamespace(DataType=SimpleNamespace(FLOAT=Named("FLOAT")))
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt)
    model, plan, layout = planned(tiny_bundle_322, "global")
    network = FakeNetwork(layout.layers)
    report = trt_build._pin_fp32(network, fp32_nodes(plan))  # type: ignore[arg-type]
    pinned = {p.layer for p in report.pins}
    for i, layer in enumerate(network.layers):
        if i not in pinned:
            assert layer.precision is None and not layer.output_types
            continue
        if layer.type.name == "TOPK":  # values fp32, precision left to TensorRT
            assert layer.precision is None and layer.output_types == {0: "FLOAT"}
            continue
        assert layer.precision is not None and layer.precision.name == "FLOAT"
        floats = {k for k, t in enumerate(layer._outputs) if t.dtype.name == "FLOAT"}
        assert set(layer.output_types) == floats and set(layer.output_types.values()) <= {"FLOAT"}
    squares = [layer for layer in network.layers if layer.name.startswith(trt_pins.UNNAMED)]
    assert len(squares) == 3 and all(s.output_types == {0: "FLOAT"} for s in squares)


def test_build_trt_prints_the_report_and_keeps_the_pins_beside_the_engine(
    tiny_bundle_322: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """build-trt end to end with the TensorRT calls replaced: the importer layout, no GPU."""
    import json
    import shutil

    from trt_fakes import fake_build_calls
    from typer.testing import CliRunner

    from fol_infer.cli import app, build_trt_command  # noqa: F401  (registers build-trt)

    def build(source: Path, shapes: Any, options: Any, fp32: Any, say: Any) -> Any:
        result = trt_build.BuildResult(engine=b"engine for " + source.name.encode())
        if fp32 is not None:
            result.pins = trt_pins.plan_pins(ImporterLayout(onnx.load(str(source))).layers, fp32)
            result.notes = result.pins.lines(source.stem)
        return result

    fake_build_calls(monkeypatch, build)
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_322, copy)
    result = CliRunner().invoke(app, ["build-trt", str(copy), "--max-batch", "2"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich wraps long lines
    assert "global: 3 of them added by the parser without an ONNX node" in text
    assert "local: 1 of them added by the parser" in text
    assert "(1 comparison: fp32 inputs, bool outputs; 2 rankings: fp32 values" in text
    pins = json.loads((copy / "local.fp16.engine").with_suffix(".pins.json").read_text())
    assert set(pins["nodes"].values()) == {"pinned", "comparison", "float outputs only"}
    result = CliRunner().invoke(app, ["build-trt", str(copy), "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    left = sorted(p.name for p in copy.iterdir() if "engine" in p.name or p.suffix == ".json")
    assert left == [
        "global.fp32.engine",
        "global.fp32.layers.json",
        "local.fp32.engine",
        "local.fp32.layers.json",
        "manifest.json",
        "rerank.fp16.engine",  # float16 candidates, float32 arithmetic, whatever --precision
        "rerank.fp16.layers.json",
    ]


def test_network_views_skip_absent_optional_inputs() -> None:
    f = TensorView("x", "FLOAT")
    network = FakeNetwork(
        [LayerView(0, "node_slice", "[ONNX Layer: node_slice]", "SLICE", (f,), (f,))]
    )
    network.layers[0]._inputs.append(None)  # type: ignore[arg-type]  (get_input's None)
    network.layers[0].num_inputs = 2
    (view,) = trt_build.network_layers(network)  # type: ignore[arg-type]
    assert view.inputs == (f,) and view.kind == "SLICE" and view.metadata.endswith("node_slice]")
