"""``rerank.onnx``: spec section 7's mutual-match count as a graph ONNX Runtime and TensorRT run.

A JetPack image always has TensorRT but does not promise torch or triton, so the bundle carries
the re-ranker itself. The graph scores one query against a chunk of candidates, every token set
padded to the bundle's token capacity:

    query (C, D), query_count (1,), candidates (chunk, C, D), candidate_counts (chunk,),
    threshold (1,)  ->  matches (chunk,)

Only the chunk axis is dynamic, so memory is bounded by the chunk a runner streams. Exactness
in every runtime comes from using no op whose tie order a runtime may choose: S = Q R^T is
computed once in float32 (fp16 candidates are cast up first), padded rows and columns are set to
-inf before any reduction, and each argmax is "the smallest index whose value equals the max"
(ReduceMax, Equal, Where, ReduceMin), which is the lowest-index rule by construction; TensorRT's
ArgMax is a TopK whose tie order is not documented. Indices are carried as float32 (exact below
2^24) so that every reduction is a float one. A pair counts when the candidate side's argmax of
the query side's argmax comes back to the row and S > threshold; a padded row's maximum is -inf
and never passes. Built with the ``onnx`` helper API: no torch, no weights, a few kilobytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

GRAPH_NAME = "rerank"
GRAPH_FILE = "rerank.onnx"
CHUNK_AXIS = "chunk"
INPUTS = ("query", "query_count", "candidates", "candidate_counts", "threshold")
OUTPUT = "matches"
DEFAULT_OPSET = 18
TOKEN_DTYPES = ("float32", "float16")


def build_rerank_model(
    capacity: int, dim: int, candidate_dtype: str = "float32", opset: int = DEFAULT_OPSET
) -> onnx.ModelProto:
    """The re-rank graph for token sets of at most ``capacity`` tokens of width ``dim``.

    The query is float32 (the encoder's output, sent once per query). ``candidate_dtype`` is
    the candidates' storage type: float16 candidates (an index's tokens, half the bytes to
    stream) are cast to float32 inside, before the product; the TensorRT engine is built from
    that variant. Counts are int32.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if capacity < 1 or dim < 1:
        raise ValueError(f"capacity and dim must be positive, got {capacity} and {dim}")
    if capacity >= 1 << 24:
        raise ValueError(f"capacity {capacity} is beyond float32's exact integers")
    if candidate_dtype not in TOKEN_DTYPES:
        raise ValueError(f"candidate_dtype must be one of {', '.join(TOKEN_DTYPES)}")
    if opset < 18:
        raise ValueError(f"opset {opset} < 18: the graph passes reduction axes as inputs")
    cand_type = TensorProto.FLOAT if candidate_dtype == "float32" else TensorProto.FLOAT16
    index = np.arange(capacity, dtype=np.float32)
    consts: dict[str, np.ndarray] = {
        "q_index": index.reshape(1, capacity, 1),  # query token i, along S's rows
        "r_index": index.reshape(1, 1, capacity),  # candidate token j, along S's columns
        "q_line": index.reshape(1, capacity),
        "neg_inf": np.array([-np.inf], np.float32),
        "beyond": np.array([float(capacity)], np.float32),  # above every index
        "one": np.array([1.0], np.float32),
        "zero": np.array([0.0], np.float32),
        "axis_1": np.array([1], np.int64),
        "axis_2": np.array([2], np.int64),
        "axes_12": np.array([1, 2], np.int64),
    }
    init = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    node = helper.make_node
    nodes = []
    q, r = "query", "candidates"
    if candidate_dtype != "float32":
        r = "candidates_f32"
        nodes.append(node("Cast", ["candidates"], [r], to=TensorProto.FLOAT, name="to_f32"))
    nodes += [
        # S[k, i, j] = <query_i, candidate_kj>, float32 accumulation
        node("Transpose", [r], ["r_t"], perm=[0, 2, 1], name="candidates_t"),
        node("MatMul", [q, "r_t"], ["s"], name="similarity"),
        # padded rows (i >= nq) and columns (j >= nr_k) become -inf: they never win a max
        node("Cast", ["query_count"], ["nq"], to=TensorProto.FLOAT, name="nq_f32"),
        node("Less", ["q_index", "nq"], ["q_valid"], name="q_valid"),
        node("Cast", ["candidate_counts"], ["nr"], to=TensorProto.FLOAT, name="nr_f32"),
        node("Unsqueeze", ["nr", "axes_12"], ["nr_3d"], name="nr_3d"),
        node("Less", ["r_index", "nr_3d"], ["r_valid"], name="r_valid"),
        node("And", ["q_valid", "r_valid"], ["valid"], name="valid"),
        node("Where", ["valid", "s", "neg_inf"], ["s_masked"], name="mask_padding"),
        # j(i): lowest column holding the row maximum
        node("ReduceMax", ["s_masked", "axis_2"], ["row_max"], keepdims=1, name="row_max"),
        node("Equal", ["s_masked", "row_max"], ["at_row_max"], name="at_row_max"),
        node("Where", ["at_row_max", "r_index", "beyond"], ["row_cands"], name="row_cands"),
        node("ReduceMin", ["row_cands", "axis_2"], ["j_of_i"], keepdims=0, name="j_of_i"),
        # i(j): lowest row holding the column maximum
        node("ReduceMax", ["s_masked", "axis_1"], ["col_max"], keepdims=1, name="col_max"),
        node("Equal", ["s_masked", "col_max"], ["at_col_max"], name="at_col_max"),
        node("Where", ["at_col_max", "q_index", "beyond"], ["col_cands"], name="col_cands"),
        node("ReduceMin", ["col_cands", "axis_1"], ["i_of_j"], keepdims=0, name="i_of_j"),
        # pair (i, j(i)) counts when i(j(i)) == i and S[i, j(i)] = row max > threshold
        node("Cast", ["j_of_i"], ["j_index"], to=TensorProto.INT32, name="j_index"),
        node("GatherElements", ["i_of_j", "j_index"], ["i_back"], axis=1, name="i_back"),
        node("Equal", ["i_back", "q_line"], ["mutual"], name="mutual"),
        node("Squeeze", ["row_max", "axis_2"], ["best"], name="best"),
        node("Greater", ["best", "threshold"], ["above"], name="above"),
        node("And", ["mutual", "above"], ["counted"], name="counted"),
        node("Where", ["counted", "one", "zero"], ["counted_f32"], name="counted_f32"),
        node("ReduceSum", ["counted_f32", "axis_1"], ["total"], keepdims=0, name="total"),
        node("Cast", ["total"], [OUTPUT], to=TensorProto.INT32, name="matches"),
    ]
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "fol_rerank",
        [
            value("query", TensorProto.FLOAT, [capacity, dim]),
            value("query_count", TensorProto.INT32, [1]),
            value("candidates", cand_type, [CHUNK_AXIS, capacity, dim]),
            value("candidate_counts", TensorProto.INT32, [CHUNK_AXIS]),
            value("threshold", TensorProto.FLOAT, [1]),
        ],
        [value(OUTPUT, TensorProto.INT32, [CHUNK_AXIS])],
        initializer=init,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="fol-infer"
    )
    model.ir_version = min(model.ir_version, 9)  # readable by onnxruntime >= 1.16 and TensorRT 10
    onnx.checker.check_model(model, full_check=True)
    return model


def write_rerank_graph(
    path: Path,
    capacity: int,
    dim: int,
    candidate_dtype: str = "float32",
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Build the graph and save it to ``path``."""
    import onnx

    onnx.save(build_rerank_model(capacity, dim, candidate_dtype, opset), str(path))
    return path


def reference_sets(
    tokens: np.ndarray, counts: np.ndarray
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Queries and candidates of the bundle's re-rank reference, from its reference tokens.

    Every image is a query; the candidates are every image whole, then truncated to a third of
    its tokens, so the check covers self-pairs (a count near the token count), other images and
    padding at two counts.
    """
    sets = [np.ascontiguousarray(t[: int(n)], np.float32) for t, n in zip(tokens, counts)]
    return sets, sets + [s[: len(s) // 3] for s in sets]
