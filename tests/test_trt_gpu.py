"""TensorRT on a GPU: real fp16 and fp32 engines for a tiny bundle (a section of run_gpu_all.sh).

Skipped, with the reason, where TensorRT or an NVIDIA GPU is missing: the reason is the message
a user would get (which TensorRT wheel to install, or why no GPU is usable).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fol_infer.errors import FolInferError
from fol_infer.trt import library as trt_library
from fol_infer.trt import pins as trt_pins
from fol_infer.trt import record as trt_record


def _missing() -> str | None:
    try:
        trt_library.require_tensorrt()
        trt_record.current_gpu()
    except FolInferError as exc:
        return str(exc)
    return None


MISSING = _missing()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(MISSING is not None, reason=str(MISSING))]
MAX_BATCH = 2


@pytest.fixture(scope="module")
def built(tiny_bundle_322: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny bundle built twice: fp16 (constraints on TensorRT 10) and fp32."""
    from fol_infer.export.bundle_engines import EngineSettings, build_bundle_engines

    out = tmp_path_factory.mktemp("trt")
    folders = {}
    for precision in ("fp16", "fp32"):
        folders[precision] = out / precision
        shutil.copytree(tiny_bundle_322, folders[precision])
        settings = EngineSettings(precision, MAX_BATCH, timing_cache=out / "cache")
        records = build_bundle_engines(folders[precision], settings)
        assert {r.precision for r in records.values()} == {precision}
    return folders


def _kind(fmt: str) -> str:
    """fp32, fp16 or other, from an engine inspector's "Format/Datatype" string."""
    upper = fmt.upper()
    if "FP16" in upper or "HALF" in upper:
        return "fp16"
    if "FP32" in upper or "FLOAT" in upper:
        return "fp32"
    return "other"


def test_every_pinned_layer_runs_fp32_in_the_built_engine(built: dict[str, Path]) -> None:
    if trt_library.major(trt_library.require_tensorrt()) >= 11:
        pytest.skip("TensorRT 11 builds fp16 strongly typed: no layer constraints to read back")
    checked = 0
    for graph in ("global", "local"):
        engine = built["fp16"] / trt_record.engine_file(graph, "fp16")
        info = json.loads(engine.with_suffix(trt_record.LAYERS_SUFFIX).read_text())
        pins = json.loads(engine.with_suffix(trt_record.PINS_SUFFIX).read_text())
        assert pins["via_consumer"], "no ReduceL2 square was pinned"
        full = {p["name"] for p in pins["layers"] if p["precision"]}
        outputs_only = {p["name"] for p in pins["layers"] if not p["precision"]}
        for layer in info["Layers"]:
            parts = set(str(layer["Name"]).split(" + "))  # fused layers join their names
            tensors: list[dict[str, Any]] = []
            if parts <= full:
                tensors = [*layer.get("Inputs", []), *layer.get("Outputs", [])]
            elif parts <= outputs_only:
                tensors = layer.get("Outputs", [])
            kinds = [_kind(str(t.get("Format/Datatype", ""))) for t in tensors]
            assert "fp16" not in kinds, f"{graph}: pinned layer {layer['Name']} runs fp16: {layer}"
            checked += "fp32" in kinds
    assert checked, "no pinned layer was found unfused in .layers.json: nothing was verified"


def test_cuda_graphs_replay_alternating_batch_sizes(built: dict[str, Path]) -> None:
    from fol_infer.backends.trt import TrtEncoder
    from fol_infer.bundle import Bundle
    from fol_infer.parity import load_reference

    bundle = Bundle.open(built["fp16"])
    images = load_reference(bundle)["images"][:MAX_BATCH]
    with TrtEncoder(bundle, cuda_graph=True) as graphs, TrtEncoder(bundle) as plain:
        for batch in (1, 2, 1, 2, 2, 1):
            a, b = graphs.encode(images[:batch]), plain.encode(images[:batch])
            assert graphs.cuda_graph, "CUDA graph capture failed (see the warning above)"
            np.testing.assert_array_equal(a.global_.descriptors, b.global_.descriptors)
            assert a.local is not None and b.local is not None
            np.testing.assert_array_equal(a.local.counts, b.local.counts)
            np.testing.assert_array_equal(a.local.tokens, b.local.tokens)
        device = graphs.encode_device(images)
        graphs.synchronize()
        assert device["tokens"].shape[0] == len(images)


def test_fp16_descriptors_match_the_fp32_engine_and_the_reference(
    built: dict[str, Path],
) -> None:
    from fol_infer.backends.trt import TrtEncoder
    from fol_infer.bundle import Bundle
    from fol_infer.errors import UsageError
    from fol_infer.parity import TOLERANCES, load_reference, verify

    fp16, fp32 = Bundle.open(built["fp16"]), Bundle.open(built["fp32"])
    images = load_reference(fp16)["images"][:MAX_BATCH]
    with TrtEncoder(fp16, cuda_graph=True) as half, TrtEncoder(fp32) as full:
        report = verify(fp16, half, "fp16")
        assert report.passed, report.failures
        assert verify(fp32, full, "fp32").passed
        a, b = half.encode(images), full.encode(images)
        cosine = np.sum(a.global_.descriptors * b.global_.descriptors, axis=1) / (
            np.linalg.norm(a.global_.descriptors, axis=1)
            * np.linalg.norm(b.global_.descriptors, axis=1)
        )
        assert cosine.min() >= TOLERANCES["fp16"]["global_cosine"], cosine
        assert a.local is not None and b.local is not None
        np.testing.assert_array_equal(a.local.counts, b.local.counts)
        with pytest.raises(UsageError, match="above"):
            half.encode(np.concatenate([images] * 2))


def test_the_real_parser_lays_the_graphs_out_as_the_cpu_tests_assume(
    built: dict[str, Path],
) -> None:
    """What tests/test_trt_pins.py models (unregistered squares, comparisons, TopK), for real."""
    if trt_library.major(trt_library.require_tensorrt()) >= 11:
        pytest.skip("TensorRT 11 builds fp16 strongly typed: no pins")
    import onnx

    from fol_infer.bundle import Bundle

    expected = {
        "ReduceL2": trt_pins.PINNED,
        "Greater": trt_pins.COMPARISON,
        "GreaterOrEqual": trt_pins.COMPARISON,
        "TopK": trt_pins.OUTPUTS,
    }
    for graph in ("global", "local"):
        engine = built["fp16"] / trt_record.engine_file(graph, "fp16")
        pins = json.loads(engine.with_suffix(trt_record.PINS_SUFFIX).read_text())
        model = onnx.load(str(Bundle.open(built["fp16"]).path(graph)))
        found = {n.name: expected[n.op_type] for n in model.graph.node if n.op_type in expected}
        assert found and {n: pins["nodes"][n] for n in found} == found
        norms = sum(n.op_type == "ReduceL2" for n in model.graph.node)
        assert len(pins["via_consumer"]) >= norms, pins["via_consumer"]
