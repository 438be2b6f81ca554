"""Export writes a complete, TensorRT-ready bundle, or nothing at all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="export tests need onnx")
torch = pytest.importorskip("torch", reason="export tests need PyTorch")
from onnx import TensorProto, helper  # noqa: E402

from fol_infer.bundle import Bundle  # noqa: E402
from fol_infer.errors import BundleError, DamagedFileError, UsageError  # noqa: E402
from fol_infer.export import onnx as onnx_export  # noqa: E402
from fol_infer.export.opcheck import check_bundle, check_graph  # noqa: E402


def test_bundle_contents_and_manifest(tiny_bundle: Path, tiny_checkpoint: Path) -> None:
    assert sorted(p.name for p in tiny_bundle.iterdir()) == [
        "global.onnx",
        "local.onnx",
        "manifest.json",
        "reference.npz",
        "rerank.onnx",
    ]
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    assert m["schema_version"] == 1 and m["arch"]["name"] == "tiny" and m["trained"] is False
    assert m["resolution"] == [210, 224] and m["opset"] >= 17
    assert m["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    g = m["graphs"]["global"]
    assert [i["name"] for i in g["inputs"]] == ["image"]
    assert g["inputs"][0]["shape"] == ["batch", 3, 210, 224]
    assert {o["name"]: o["shape"] for o in g["outputs"]} == {
        "global": ["batch", 8448],
        "features": ["batch", 64, 15, 16],
        "confidence": ["batch", 15, 16],
    }
    local = {o["name"]: (o["shape"], o["dtype"]) for o in m["graphs"]["local"]["outputs"]}
    assert local["tokens"] == (["batch", 3600, 128], "float32")
    assert local["count"] == (["batch"], "int32")
    from fol_infer.files.integrity import sha256_file

    assert m["checkpoint"]["sha256"] == sha256_file(tiny_checkpoint)
    rerank = m["rerank"]
    assert rerank["file"] == "rerank.onnx"
    assert {i["name"]: (i["shape"], i["dtype"]) for i in rerank["inputs"]} == {
        "query": ([3600, 128], "float32"),
        "query_count": ([1], "int32"),
        "candidates": (["chunk", 3600, 128], "float32"),
        "candidate_counts": (["chunk"], "int32"),
        "threshold": ([1], "float32"),
    }
    assert rerank["outputs"] == [{"name": "matches", "shape": ["chunk"], "dtype": "int32"}]
    assert rerank["sha256"] == sha256_file(tiny_bundle / "rerank.onnx")
    Bundle.open(tiny_bundle, verify="full")


@pytest.mark.parametrize("bundle_fixture", ["tiny_bundle", "tiny_bundle_322"])
def test_graphs_are_tensorrt_ready(bundle_fixture: str, request: pytest.FixtureRequest) -> None:
    reports = check_bundle(request.getfixturevalue(bundle_fixture))
    assert [r.path.name for r in reports] == ["global.onnx", "local.onnx", "rerank.onnx"]
    assert [r.problems for r in reports] == [[], [], []]
    ops = reports[0].op_counts + reports[1].op_counts
    assert ops["LayerNormalization"] == 2 * 2 + 1  # two per block + the final norm, fused
    assert "Resize" not in ops and "NonZero" not in ops and "ReduceLogSumExp" not in ops


def _graph(tmp_path: Path, nodes, inputs, outputs, initializers=(), opset: int = 18) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    return path


def test_opcheck_rejects_what_tensorrt_would(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, None)
    v = helper.make_tensor_value_info("v", TensorProto.FLOAT, None)
    k = helper.make_tensor("k", TensorProto.INT64, [1], [4000])
    nodes = [
        helper.make_node("NonZero", ["x"], ["y"]),
        helper.make_node("TopK", ["x", "k"], ["v", "i"]),
    ]
    report = check_graph(_graph(tmp_path, nodes, [x], [y, v], [k], opset=16))
    text = "\n".join(report.problems)
    assert "opset 16" in text
    assert "NonZero" in text and "data-dependent" in text
    assert "k=4000 >= 3840" in text
    assert "axis 1 is dynamic (n)" in text
    assert not report.ok


def test_opcheck_accepts_a_clean_graph(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])
    report = check_graph(_graph(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [x], [y]))
    assert report.ok and report.op_counts["Relu"] == 1


@pytest.mark.parametrize(
    ("resolution", "match"), [("323", "multiple of 14"), ("196", "210"), ("abc", "expected")]
)
def test_bad_resolution_is_refused_before_any_work(
    tiny_checkpoint: Path, tmp_path: Path, resolution: str, match: str
) -> None:
    with pytest.raises(UsageError, match=match):
        onnx_export.export_bundle(tiny_checkpoint, tmp_path / "b", resolution)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_is_not_a_bundle_is_never_replaced(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="is not a fol-infer bundle: choose another --out"):
        onnx_export.export_bundle(tiny_checkpoint, out, 210)
    with pytest.raises(UsageError, match="refusing to replace .*not a fol-infer bundle"):
        onnx_export.export_bundle(tiny_checkpoint, out, 210, force=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    ckpt_home = tmp_path / "models"  # --out the folder holding the checkpoint
    ckpt_home.mkdir()
    copy = ckpt_home / "tiny.pth"
    shutil.copy(tiny_checkpoint, copy)
    with pytest.raises(UsageError, match="it contains the checkpoint"):
        onnx_export.export_bundle(copy, ckpt_home, 210, force=True)
    assert copy.read_bytes() == tiny_checkpoint.read_bytes()


def test_failed_export_leaves_nothing_behind(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(onnx_export, "_export", boom)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        onnx_export.export_bundle(tiny_checkpoint, tmp_path / "b", 210)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_force_replaces_a_bundle_atomically(
    tiny_checkpoint: Path, tiny_bundle: Path, tmp_path: Path
) -> None:
    import shutil

    out = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))  # a bundle this tool exported
    first = json.loads((out / "manifest.json").read_text())["created"]
    onnx_export.export_bundle(tiny_checkpoint, out, 210, force=True)
    assert json.loads((out / "manifest.json").read_text())["created"] >= first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary folders left


def test_bundle_from_another_schema_or_tampered_is_refused(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(manifest | {"schema_version": 99}))
    with pytest.raises(BundleError, match="schema 99"):
        Bundle.open(copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with open(copy / "local.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01")
    with pytest.raises(
        DamagedFileError, match="local.onnx is damaged: its sha256.*fol-infer export"
    ):
        Bundle.open(copy, verify="full")
    (copy / "reference.npz").write_bytes(b"short")
    with pytest.raises(BundleError, match="bytes"):
        Bundle.open(copy)


def test_reference_holds_the_pytorch_outputs(tiny_bundle: Path) -> None:
    with np.load(tiny_bundle / "reference.npz") as ref:
        assert ref["images"].shape == (2, 3, 210, 224)
        assert ref["tokens"].shape == (2, 3600, 128)
        for tokens, n in zip(ref["tokens"], ref["count"]):
            np.testing.assert_allclose(np.linalg.norm(tokens[:n], axis=1), 1.0, rtol=1e-5)
            assert not tokens[n:].any()
        assert ref["region_mask"].sum(axis=(1, 2)).tolist() == [225, 225]
