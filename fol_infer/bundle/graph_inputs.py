"""The inputs of an ONNX graph, read without loading its weights (and without the onnx package).

An ``.onnx`` file is a protobuf ModelProto whose GraphProto lists nodes and initializers
(the weights, hundreds of MB for a ViT-B) before the graph inputs. This reader walks the
protobuf's length-prefixed fields and seeks past everything but the inputs, so reading them
costs a few thousand small reads, not the file. Field numbers are those of onnx.proto
(ModelProto.graph = 7, GraphProto.input = 11, ValueInfoProto.name = 1, .type = 2,
TypeProto.tensor_type = 1, Tensor.elem_type = 1, .shape = 2, TensorShapeProto.dim = 1,
Dimension.dim_value = 1, .dim_param = 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

# TensorProto.DataType values the bundles use, by the manifest's dtype names.
ELEM_TYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16"}
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class MalformedGraph(ValueError):
    """The file is not a protobuf ONNX model as far as its inputs are concerned."""


@dataclass(frozen=True)
class GraphInput:
    name: str
    dtype: str  # a manifest dtype name, or "type <n>" for others
    shape: tuple[int | str, ...]  # a dim_param name (or "?") for a symbolic axis


def read_inputs(path: Path) -> list[GraphInput]:
    """The graph's declared inputs, in order."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        graph = _find(f, 0, size, field=7)
        if graph is None:
            raise MalformedGraph(f"{path} holds no ONNX graph")
        return [_value_info(raw) for raw in _collect(f, *graph, field=11)]


def _varint(f: BinaryIO) -> int:
    shift = result = 0
    while True:
        byte = f.read(1)
        if not byte:
            raise MalformedGraph("the file ends inside a field")
        result |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return result
        shift += 7
        if shift > 63:
            raise MalformedGraph("a varint longer than 10 bytes")


def _fields(f: BinaryIO, start: int, end: int):
    """Yield (field number, start, end of its payload) for length-delimited fields in
    [start, end), skipping the others; leaves the file position after each field."""
    f.seek(start)
    while f.tell() < end:
        tag = _varint(f)
        number, wire = tag >> 3, tag & 7
        if wire == _VARINT:
            _varint(f)
        elif wire == _I64:
            f.seek(8, 1)
        elif wire == _I32:
            f.seek(4, 1)
        elif wire == _LEN:
            length = _varint(f)
            here = f.tell()
            if here + length > end:
                raise MalformedGraph("a field runs past its parent")
            yield number, here, here + length
            f.seek(here + length)
        else:
            raise MalformedGraph(f"unsupported protobuf wire type {wire}")


def _find(f: BinaryIO, start: int, end: int, field: int) -> tuple[int, int] | None:
    for number, a, b in _fields(f, start, end):
        if number == field:
            return a, b
    return None


def _collect(f: BinaryIO, start: int, end: int, field: int) -> list[bytes]:
    out = []
    for number, a, b in _fields(f, start, end):
        if number == field:
            f.seek(a)
            out.append(f.read(b - a))
    return out


def _parse(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, varint value or bytes) of every varint and length-delimited field."""
    out: list[tuple[int, int | bytes]] = []
    i = 0

    def varint() -> int:
        nonlocal i
        shift = value = 0
        while True:
            if i >= len(data):
                raise MalformedGraph("a message ends inside a field")
            b = data[i]
            i += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7

    while i < len(data):
        tag = varint()
        number, wire = tag >> 3, tag & 7
        if wire == _VARINT:
            out.append((number, varint()))
        elif wire == _LEN:
            n = varint()
            out.append((number, data[i : i + n]))
            i += n
        elif wire in (_I64, _I32):
            i += 8 if wire == _I64 else 4
        else:
            raise MalformedGraph(f"unsupported protobuf wire type {wire}")
    return out


def _value_info(raw: bytes) -> GraphInput:
    name, dtype = "", "?"
    shape: tuple[int | str, ...] = ()
    for number, value in _parse(raw):
        if number == 1 and isinstance(value, bytes):
            name = value.decode("utf-8", "replace")
        elif number == 2 and isinstance(value, bytes):
            for n2, tensor in _parse(value):
                if n2 == 1 and isinstance(tensor, bytes):
                    dtype, shape = _tensor_type(tensor)
    return GraphInput(name, dtype, shape)


def _tensor_type(raw: bytes) -> tuple[str, tuple[int | str, ...]]:
    dtype, dims = "?", []
    for number, value in _parse(raw):
        if number == 1 and isinstance(value, int):
            dtype = ELEM_TYPES.get(value, f"type {value}")
        elif number == 2 and isinstance(value, bytes):
            for n2, dim in _parse(value):
                if n2 == 1 and isinstance(dim, bytes):
                    dims.append(_dim(dim))
    return dtype, tuple(dims)


def _dim(raw: bytes) -> int | str:
    for number, value in _parse(raw):
        if number == 1 and isinstance(value, int):
            return value
        if number == 2 and isinstance(value, bytes):
            return value.decode("utf-8", "replace")
    return "?"
