"""Which layers of a parsed TensorRT network to constrain to fp32, from the ONNX precision plan.

TensorRT 10's weak typing takes the plan as per-layer constraints, and the layers are not the
nodes: the ONNX parser adds layers of its own. ReduceL2 and ReduceSumSquare become an x·x
element-wise layer that the parser never registers (no `[ONNX Layer: ...]` metadata, TensorRT's
default "(Unnamed Layer* N)" name) feeding the registered reduction, so a plan matched by name
alone would leave every square in fp16, where it overflows for |x| > 255. Layers are therefore
matched to nodes by the parser's metadata (or names, or output tensors), and an unregistered
layer computing on floats is pinned when it feeds a pinned layer.

With `OBEY_PRECISION_CONSTRAINTS` a constraint no implementation meets fails the build, so
layers that cannot honour one are skipped, as Polygraphy's `debug precision` skips them:
constants, layers with a shape-tensor output, and layers with an output that is not float
(TopK's indices). Two kinds of layer the plan needs are half-constrained instead, each with a
constraint an fp32 implementation always meets: comparisons (float inputs, bool outputs) get
their precision and keep their output types; rankings (float inputs, float values and integer
indices) keep their precision free but their float outputs fp32, so TopK's keys, which reach
19,881, are never rounded to fp16.

Pure: it works on plain descriptions of the network (`LayerView`), built from TensorRT in
`trt.build` and from the exported graphs with the parser's layout in the tests.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

FLOATS = frozenset({"FLOAT", "HALF"})
UNNAMED = "(Unnamed Layer"  # TensorRT's name for a layer nobody named: the parser never did
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]|\x1e\x1f]+?)\s*(?:\|[^\]]*)?\]")

# What happened to a planned node, in the order a report lists them.
PINNED, COMPARISON, OUTPUTS = "pinned", "comparison", "float outputs only"
SKIPPED = ("constant", "shape tensor", "non-float output")
FOLDED = "folded"


@dataclass(frozen=True)
class TensorView:
    name: str
    dtype: str  # TensorRT DataType name: FLOAT, HALF, BOOL, INT32, INT64, ...
    shape: bool = False  # a shape tensor, or not an execution tensor


@dataclass(frozen=True)
class LayerView:
    index: int
    name: str
    metadata: str
    kind: str  # TensorRT LayerType name
    inputs: tuple[TensorView, ...]
    outputs: tuple[TensorView, ...]


@dataclass(frozen=True)
class Pin:
    layer: int
    name: str
    float_outputs: tuple[int, ...]  # set_output_type(FLOAT) on these only
    precision: bool = True  # False: output types only (a ranking with integer outputs)


@dataclass
class PinReport:
    """The constraints to apply, and what became of each planned node."""

    pins: list[Pin] = field(default_factory=list)
    via_consumer: list[str] = field(default_factory=list)  # unregistered layers pinned
    nodes: dict[str, str] = field(default_factory=dict)  # planned node -> outcome

    def count(self, outcome: str) -> list[str]:
        return sorted(n for n, o in self.nodes.items() if o == outcome)

    def lines(self, graph: str) -> list[str]:
        """What build-trt says: pinned, pinned via a consumer, skipped and why, folded."""
        pinned, compared, ranked = (self.count(o) for o in (PINNED, COMPARISON, OUTPUTS))
        kept = [
            f"{_count(compared, 'comparison')}: fp32 inputs, bool outputs" if compared else "",
            f"{_count(ranked, 'ranking')}: fp32 values, precision free" if ranked else "",
        ]
        said = [
            f"{graph}: {_count(self.pins, 'layer')} constrained to fp32 for "
            f"{len(pinned) + len(compared) + len(ranked)} of {len(self.nodes)} planned nodes"
            + (f" ({'; '.join(k for k in kept if k)})" if any(kept) else "")
        ]
        if self.via_consumer:
            said.append(
                f"{graph}: {len(self.via_consumer)} of them added by the parser without an ONNX "
                "node (such as ReduceL2's x·x), pinned because they feed a pinned layer, e.g. "
                + ", ".join(self.via_consumer[:3])
            )
        for reason in SKIPPED:
            if names := self.count(reason):
                said.append(
                    f"{graph}: {_count(names, 'planned node')} left to TensorRT: {reason} "
                    f"(cannot obey a precision constraint), e.g. {', '.join(names[:3])}"
                )
        if names := self.count(FOLDED):
            said.append(
                f"{graph}: {_count(names, 'planned node')} without a layer of its own (folded by "
                f"the parser), e.g. {', '.join(names[:3])}"
            )
        return said

    def to_dict(self) -> dict[str, Any]:
        """The record written beside the engine (`.pins.json`)."""
        return {
            "layers": [
                {"name": p.name, "precision": p.precision, "float_outputs": list(p.float_outputs)}
                for p in self.pins
            ],
            "via_consumer": self.via_consumer,
            "nodes": dict(sorted(self.nodes.items())),
        }


def _count(items: Sequence[object], noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def layer_nodes(
    metadata: str, layer_name: str, outputs: Sequence[str], node_of_output: Mapping[str, str]
) -> set[str]:
    """ONNX nodes a network layer came from: the parser's metadata, else names, else outputs."""
    found = set(_ONNX_LAYER.findall(metadata))
    if found:
        return found
    if layer_name in node_of_output.values():
        return {layer_name}
    return {node_of_output[o] for o in outputs if o in node_of_output}


def registered(layer: LayerView) -> bool:
    """Whether the parser registered the layer for a node or weights (it names all of those)."""
    return bool(_ONNX_LAYER.search(layer.metadata)) or not layer.name.startswith(UNNAMED)


def is_comparison(layer: LayerView) -> bool:
    return (
        bool(layer.outputs)
        and all(t.dtype == "BOOL" for t in layer.outputs)
        and any(t.dtype in FLOATS for t in layer.inputs)
    )


def skip_reason(layer: LayerView) -> str | None:
    """Why a precision constraint on this layer could fail the build; None when it cannot."""
    if layer.kind == "CONSTANT":
        return SKIPPED[0]
    if any(t.shape for t in layer.outputs):
        return SKIPPED[1]
    if all(t.dtype in FLOATS for t in layer.outputs) or is_comparison(layer):
        return None
    return SKIPPED[2]


def _pin(layer: LayerView, precision: bool = True) -> Pin:
    floats = tuple(k for k, t in enumerate(layer.outputs) if t.dtype in FLOATS)
    return Pin(layer.index, layer.name, floats, precision)


def is_ranking(layer: LayerView) -> bool:
    """Float values with integer indices (TopK): the values can be kept fp32 on their own."""
    return (
        skip_reason(layer) == SKIPPED[2]
        and any(t.dtype in FLOATS for t in layer.outputs)
        and any(t.dtype in FLOATS for t in layer.inputs)
    )


def plan_pins(layers: Sequence[LayerView], fp32: Mapping[str, Sequence[str]]) -> PinReport:
    """Pins for the plan's fp32 nodes (node name -> its output tensors) on a parsed network."""
    node_of_output = {out: node for node, outs in fp32.items() for out in outs}
    outcomes: dict[str, set[str]] = {node: set() for node in fp32}
    pins: dict[int, Pin] = {}
    for layer in layers:
        nodes = layer_nodes(
            layer.metadata, layer.name, [t.name for t in layer.outputs], node_of_output
        )
        nodes &= fp32.keys()
        if not nodes:
            continue
        reason = skip_reason(layer)
        if reason is None:
            pins[layer.index] = _pin(layer)
            reason = COMPARISON if is_comparison(layer) else PINNED
        elif is_ranking(layer):
            pins[layer.index] = _pin(layer, precision=False)
            reason = OUTPUTS
        for node in nodes:
            outcomes[node].add(reason)
    consumers: dict[str, set[int]] = {}
    for layer in layers:
        for t in layer.inputs:
            consumers.setdefault(t.name, set()).add(layer.index)
    via: list[str] = []
    for layer in reversed(layers):  # layers come in topological order: chains pin backwards
        if layer.index in pins or registered(layer) or skip_reason(layer) is not None:
            continue
        if not any(t.dtype in FLOATS for t in layer.inputs):  # a cast from integers: exact
            continue
        if any(pins.keys() & consumers.get(t.name, set()) for t in layer.outputs):
            pins[layer.index] = _pin(layer)
            via.append(layer.name)
    report = PinReport(pins=[pins[i] for i in sorted(pins)], via_consumer=via[::-1])
    order = (PINNED, COMPARISON, OUTPUTS, *SKIPPED[::-1])  # a node's own layer before its constants
    for node, seen in outcomes.items():
        report.nodes[node] = next((o for o in order if o in seen), FOLDED)
    return report
