"""The rerank engine, tested without TensorRT: its graph, build settings, records and refusals.

The engine's graph (float16 candidates) runs in ONNX Runtime here and must give the CPU
re-ranker's counts; the TensorRT calls are type-checked with the rest of the package
(test_trt_cpu.py). One test builds the engine and is skipped unless TensorRT and a GPU exist.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fol_infer.bundle import Bundle
from fol_infer.errors import BackendUnavailableError, BundleError, UsageError
from fol_infer.rerank.cpu import count_mutual_matches_many_cpu
from fol_infer.trt import record as trt_record
from fol_infer.trt.record import EngineRecord, GpuInfo, Profile

onnx = pytest.importorskip("onnx", reason="the re-rank graph is built with onnx")
from onnx import TensorProto  # noqa: E402

from fol_infer.export import rerank_engine  # noqa: E402
from fol_infer.export.opcheck import check_graph  # noqa: E402
from fol_infer.rerank import trt_runner  # noqa: E402
from fol_infer.rerank.onnx_runner import CPU, OnnxReranker  # noqa: E402

HERE = GpuInfo("NVIDIA Jetson AGX Orin", "8.7", "12.6")


def test_chunk_profile_is_checked_before_anything_is_built() -> None:
    assert rerank_engine.chunk_profile(8) == Profile(1, 8, 8)
    assert rerank_engine.chunk_profile(8, opt_chunk=2) == Profile(1, 2, 8)
    for bad in ({"max_chunk": 0}, {"max_chunk": 257}, {"max_chunk": 4, "opt_chunk": 5}):
        with pytest.raises(UsageError, match="chunk"):
            rerank_engine.chunk_profile(**bad)


def test_build_settings_fix_the_query_and_vary_the_chunk(tiny_bundle: Path) -> None:
    bundle = Bundle.open(tiny_bundle)
    shapes = rerank_engine.input_shapes(bundle)
    assert shapes == {
        "query": [3600, 128],
        "query_count": [1],
        "candidates": [3600, 128],
        "candidate_counts": [],
        "threshold": [1],
    }
    options = rerank_engine.build_options(Profile(1, 4, 16), 2.0, None)
    assert options.strongly_typed  # the graph's Cast decides every precision: fp32 arithmetic
    assert options.batch == (1, 4, 16) and options.workspace_gib == 2.0
    assert set(options.static_inputs) == {"query", "query_count", "threshold"}
    assert set(options.static_inputs) | {"candidates", "candidate_counts"} == set(shapes)


def test_engine_graph_casts_float16_candidates_up_and_computes_in_float32(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    path = rerank_engine.write_engine_graph(Bundle.open(tiny_bundle), tmp_path)
    assert check_graph(path, batch_axis_name="chunk").problems == []
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
    assert types["candidates"] == TensorProto.FLOAT16 and types["query"] == TensorProto.FLOAT
    casts = [n for n in model.graph.node if n.op_type == "Cast" and n.input[0] == "candidates"]
    assert len(casts) == 1
    halves = [v.name for v in model.graph.value_info if v.type.tensor_type.elem_type == 10]
    assert halves == []  # nothing after the Cast is float16
    matmul = next(n for n in model.graph.node if n.op_type == "MatMul")
    assert matmul.input[0] == "query"
    assert not {"ArgMax", "ArgMin", "TopK", "NonZero"} & {n.op_type for n in model.graph.node}


def test_engine_graph_counts_like_the_cpu_on_float16_candidates() -> None:
    from fol_infer.rerank.graph import build_rerank_model

    r = OnnxReranker(
        build_rerank_model(64, 32, "float16").SerializeToString(), providers=[CPU], chunk=3
    )
    rng = np.random.default_rng(2)
    q = rng.standard_normal((60, 32)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    cands = [(q[:n] + 0.2 * rng.standard_normal((n, 32))).astype(np.float16) for n in (60, 30, 1)]
    cands += [np.zeros((0, 32), np.float16), rng.standard_normal((64, 32)).astype(np.float16)]
    want = count_mutual_matches_many_cpu([q], [cands], 0.7)[0]
    assert want[0] > 0
    np.testing.assert_array_equal(r.count_many([q], [cands], 0.7)[0], want)


def with_rerank_engine(bundle_dir: Path, tmp_path: Path, gpu: GpuInfo = HERE) -> Bundle:
    """A copy of a bundle with a rerank engine file and record, as build-trt leaves them."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    bundle = Bundle.open(copy)
    data = b"not a real rerank engine"
    (copy / "rerank.fp16.engine").write_bytes(data)
    assert bundle.manifest.rerank is not None
    record = EngineRecord(
        graph="rerank",
        file="rerank.fp16.engine",
        sha256="0" * 64,
        bytes=len(data),
        onnx_sha256=bundle.manifest.rerank.sha256,
        tensorrt="10.3.0",
        gpu=gpu.name,
        compute_capability=gpu.compute_capability,
        precision="fp16",
        mode="strongly-typed",
        profile=Profile(1, 8, 8),
        workspace_gib=None,
        fp32_nodes=26,
        built="2026-01-01T00:00:00+00:00",
    )
    trt_record.set_records(bundle.manifest, {"rerank": record})
    bundle.manifest.write(copy)
    return Bundle.open(copy)


def test_rerank_records_are_read_checked_and_name_their_rebuild(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    with pytest.raises(BundleError, match="no TensorRT rerank engine: build it .* build-trt"):
        trt_runner.rerank_record(Bundle.open(tiny_bundle))
    bundle = with_rerank_engine(tiny_bundle, tmp_path)
    record = trt_runner.rerank_record(bundle)
    assert record.profile == Profile(1, 8, 8)
    assert trt_record.rebuild_command(bundle.folder, record).endswith("--rerank-chunk 8")
    trt_record.check_record(bundle, record, "10.3.0", HERE)  # loadable here
    with pytest.raises(BundleError, match="built with TensorRT 10.3.0 for NVIDIA Jetson"):
        trt_record.check_record(bundle, record, "10.3.0", replace(HERE, name="NVIDIA H100"))
    with pytest.raises(BundleError, match="older rerank graph .* --rerank-chunk 8"):
        trt_record.check_record(bundle, replace(record, onnx_sha256="1" * 64), "10.3.0", HERE)
    manifest = json.loads((bundle.folder / "manifest.json").read_text())
    manifest["engines"]["rerank"]["profile"] = "eight"
    (bundle.folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="malformed rerank engine record"):
        trt_runner.rerank_record(Bundle.open(bundle.folder))


def test_trt_reranker_here_says_why_it_cannot_run(tiny_bundle: Path, tmp_path: Path) -> None:
    from fol_infer.rerank.trt_runner import TrtReranker, trt_unavailable_reason

    assert "no rerank engine" in str(trt_unavailable_reason(Bundle.open(tiny_bundle)))
    bundle = with_rerank_engine(tiny_bundle, tmp_path)
    reason = trt_unavailable_reason(bundle)  # no TensorRT here; elsewhere the fake is refused
    assert reason is not None and ("TensorRT" in reason or "driver" in reason), reason
    with pytest.raises((BackendUnavailableError, BundleError)):
        TrtReranker(bundle)


def test_build_refuses_a_bad_chunk_before_tensorrt_and_leaves_the_bundle(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    from fol_infer.export.bundle_engines import EngineSettings, build_bundle_engines

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    before = sorted(p.name for p in copy.iterdir())
    with pytest.raises(UsageError, match="--rerank-chunk must be between 1 and 256"):
        build_bundle_engines(copy, EngineSettings(rerank_chunk=0))
    assert sorted(p.name for p in copy.iterdir()) == before


# --- on a GPU with TensorRT only ---------------------------------------------------------------


@pytest.mark.gpu
def test_rerank_engine_builds_and_counts_exactly_on_a_gpu(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    from fol_infer.trt.library import require_tensorrt

    try:
        require_tensorrt()
        trt_record.current_gpu()
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    from fol_infer.export.bundle_engines import EngineSettings, build_bundle_engines
    from fol_infer.rerank import count_mutual_matches
    from fol_infer.rerank.graph_check import check_rerank

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    records = build_bundle_engines(copy, EngineSettings("fp16", max_batch=2, rerank_chunk=4))
    assert records["rerank"].profile == Profile(1, 4, 4)
    bundle = Bundle.open(copy)
    check = check_rerank(bundle, "trt")
    assert check.passed, check
    rng = np.random.default_rng(0)
    q = rng.integers(-2, 3, (500, 128)).astype(np.float32) / 8
    cands = [rng.integers(-2, 3, (n, 128)).astype(np.float16) / 8 for n in (500, 3600, 0, 9, 1)]
    want = count_mutual_matches(q, cands, 0.5, backend="cpu")
    np.testing.assert_array_equal(count_mutual_matches(q, cands, 0.5, "trt", bundle), want)
    np.testing.assert_array_equal(count_mutual_matches(q, cands, 0.5, "auto", bundle), want)


def test_auto_picks_the_rerank_engine_where_tensorrt_loads_it_and_triton_does_not(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Jetson case, with the engine replaced by a stand-in that scores on the CPU."""
    import fol_infer.rerank.dispatch as rerank
    from fol_infer.rerank import count_mutual_matches, trt_runner

    calls: list[int] = []

    class StandIn:
        def count_many(self, qs, cls, threshold):
            calls.append(len(cls[0]))
            return count_mutual_matches_many_cpu(qs, cls, threshold)

    bundle = Bundle.open(tiny_bundle)
    q = np.eye(4, 128, dtype=np.float32)
    monkeypatch.setattr(rerank, "_triton_unavailable_reason", lambda: "no NVIDIA GPU found")
    monkeypatch.setattr(trt_runner, "trt_unavailable_reason", lambda b: None)
    monkeypatch.setattr(trt_runner, "bundle_trt_reranker", lambda b: StandIn())
    assert count_mutual_matches(q, [q, q[:1]], backend="auto", bundle=bundle).tolist() == [4, 1]
    assert calls == [2]
    monkeypatch.setattr(trt_runner, "trt_unavailable_reason", lambda b: "no rerank engine")
    assert count_mutual_matches(q, [q], backend="auto", bundle=bundle).tolist() == [4]
    assert calls == [2]  # the CPU re-ranker scored it


def test_build_trt_builds_and_records_the_rerank_engine(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """build-trt with the TensorRT calls replaced: what the rerank build is given and records."""
    from trt_fakes import fake_build_calls

    from fol_infer.export.bundle_engines import EngineSettings, build_bundle_engines
    from fol_infer.trt import build as trt_build

    seen: dict[str, tuple[Any, ...]] = {}

    def build(source: Path, shapes: Any, options: Any, fp32: Any, say: Any) -> Any:
        seen[source.name] = (dict(shapes), options, onnx.load(str(source)))
        return trt_build.BuildResult(engine=b"engine for " + source.name.encode())

    fake_build_calls(monkeypatch, build, "10.3.0", HERE)
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    records = build_bundle_engines(copy, EngineSettings("fp16", max_batch=2, rerank_chunk=4))
    shapes, options, graph = seen["rerank.fp16-candidates.onnx"]
    assert shapes["candidates"] == [3600, 128] and shapes["candidate_counts"] == []
    assert options.batch == (1, 4, 4) and options.strongly_typed
    assert graph.graph.input[2].type.tensor_type.elem_type == TensorProto.FLOAT16
    bundle = Bundle.open(copy, verify="full")
    record = trt_runner.rerank_record(bundle)
    assert record == records["rerank"] and record.profile == Profile(1, 4, 4)
    assert record.onnx_sha256 == bundle.manifest.rerank.sha256  # type: ignore[union-attr]
    assert (copy / "rerank.fp16.engine").read_bytes().endswith(b"fp16-candidates.onnx")
    trt_record.check_record(bundle, record, "10.3.0", HERE)
