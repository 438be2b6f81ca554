"""TensorRT support, tested without TensorRT: everything around the TensorRT calls.

The precision plan and the mixed-precision pass run on the real exported graphs (the pass in
onnxruntime), the manifest records and their refusals, profiles, and the messages for a
missing TensorRT, a missing GPU and a bad batch are checked here; the TensorRT calls
themselves are type-checked against tensorrt-stubs (`test_typecheck.py`); the layer pins in
`test_trt_pins.py`, the runtime's CUDA handling in `test_trt_runtime.py`, and real engines on a
GPU in `test_trt_gpu.py`.
"""

from __future__ import annotations

import ctypes
import importlib.util
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fol_infer.bundle import Bundle
from fol_infer.errors import BackendUnavailableError, BundleError, UsageError
from fol_infer.export import precision
from fol_infer.parity import TOLERANCES
from fol_infer.trt import build as trt_build
from fol_infer.trt import library as trt_library
from fol_infer.trt import pins as trt_pins
from fol_infer.trt import record as trt_record
from fol_infer.trt.record import EngineRecord, GpuInfo, Profile

REPO = Path(__file__).resolve().parents[1]
onnx = pytest.importorskip("onnx", reason="the precision plan reads ONNX graphs (pip install onnx)")
FP16 = TOLERANCES["fp16"]
HERE = GpuInfo("NVIDIA H100 80GB HBM3", "9.0", "12.8")


def tensorrt_installed() -> bool:
    try:
        trt_library.require_tensorrt()
    except BackendUnavailableError:
        return False
    return True


def load(bundle_dir: Path, graph: str) -> Any:
    return onnx.load(str(Bundle.open(bundle_dir).path(graph)))


def graph_io(model: Any) -> list[tuple[str, int]]:
    values = (*model.graph.input, *model.graph.output)
    return [(v.name, v.type.tensor_type.elem_type) for v in values]


def consumers(model: Any, tensor: str) -> list[Any]:
    return [n for n in model.graph.node if tensor in n.input]


# --- the precision plan, on the real exported graphs ----------------------------------------


@pytest.mark.parametrize("graph", ["global", "local"])
def test_plan_pins_sensitive_ops_and_leaves_heavy_ops_fp16(
    tiny_bundle_322: Path, graph: str
) -> None:
    model = load(tiny_bundle_322, graph)
    plan = precision.plan_precision(model)
    sensitive = precision.CHAIN_OPS | precision.POINT_OPS
    for node in model.graph.node:
        if node.op_type in sensitive:
            assert node.name in plan.fp32, f"{node.op_type} {node.name} is not pinned"
        if node.op_type in {"Conv", "ConvTranspose", "Gemm"}:
            assert node.name in plan.fp16, f"{node.op_type} {node.name} should run fp16"
    weights = {t.name for t in model.graph.initializer}
    linear = [n for n in model.graph.node if n.op_type == "MatMul" and set(n.input) & weights]
    assert all(n.name in plan.fp16 for n in linear)
    assert set(plan.fp32).isdisjoint(plan.fp16) and plan.fp16


def test_plan_covers_sinkhorn_and_l2_normalisations(tiny_bundle_322: Path) -> None:
    model = load(tiny_bundle_322, "global")
    plan = precision.plan_precision(model)
    types = precision.tensor_types(model)
    for node in model.graph.node:
        if node.op_type in {"Exp", "Log", "ReduceMax"}:  # every step of the log-sum-exps
            for user in consumers(model, node.output[0]):
                if any(precision._is_float(types.get(t)) for t in user.output):
                    assert user.name in plan.fp32, f"{user.op_type} after {node.op_type}"
    norms = [n for n in model.graph.node if n.op_type == "ReduceL2"]
    assert norms
    for norm in norms:  # ReduceL2 -> Clip -> Expand -> Div: the divisions are pinned too
        frontier: list[Any] = [norm]
        divisions: list[Any] = []
        while frontier:
            node = frontier.pop()
            for user in consumers(model, node.output[0]):
                (divisions if user.op_type == "Div" else frontier).append(user)
                assert user.name in plan.fp32, f"{user.op_type} {user.name} of an L2 norm"
        assert divisions


def test_plan_keeps_the_local_rankings_exact(tiny_bundle_322: Path) -> None:
    model = load(tiny_bundle_322, "local")
    plan = precision.plan_precision(model)
    producer = {out: n for n in model.graph.node for out in n.output}
    topks = [n for n in model.graph.node if n.op_type == "TopK"]
    assert len(topks) == 2
    for topk in topks:  # the keys ranked, up to 19,881: computed in fp32
        assert producer[topk.input[0]].name in plan.fp32 or topk.input[0] in {
            i.name for i in model.graph.input
        }
    count = producer[next(o.name for o in model.graph.output if o.name == "count")]
    assert producer[count.input[0]].op_type == "ReduceSum"
    assert producer[count.input[0]].name in plan.fp32
    gathers = [n for n in model.graph.node if n.op_type in {"Gather", "GatherElements"}]
    assert gathers and all(n.name in plan.fp32 for n in gathers)
    assert [n.op_type for n in model.graph.node if n.name in plan.fp16].count("ConvTranspose") == 2


def test_unnamed_nodes_are_refused() -> None:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    node = helper.make_node("Relu", ["x"], ["y"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]))
    with pytest.raises(ValueError, match="empty or repeated name"):
        precision.plan_precision(model)


# --- the mixed-precision graph (TensorRT 11's input), run in onnxruntime --------------------


def test_mixed_graph_puts_casts_exactly_at_the_borders(
    tiny_bundle_322: Path, tmp_path: Path
) -> None:
    bundle = Bundle.open(tiny_bundle_322)
    for graph in ("global", "local"):
        original = onnx.load(str(bundle.path(graph)))
        plan = precision.write_mixed(bundle.path(graph), tmp_path / f"{graph}.onnx")
        mixed = onnx.load(str(tmp_path / f"{graph}.onnx"))
        types = precision.tensor_types(mixed)
        for node in mixed.graph.node:
            want = 1 if node.name in plan.fp32 else 10 if node.name in plan.fp16 else None
            if want is None or node.op_type in precision.SHAPE_ONLY_OPS:
                continue
            floats = [types[t] for t in node.input if t and precision._is_float(types.get(t))]
            assert all(t == want for t in floats), f"{node.op_type} {node.name} gets {floats}"
        assert graph_io(mixed) == graph_io(original)
        casts = [n for n in mixed.graph.node if n.op_type == "Cast"]
        assert len(casts) > len([n for n in original.graph.node if n.op_type == "Cast"])
        assert any(t.data_type == 10 for t in mixed.graph.initializer)  # fp16 weights stored fp16


@pytest.mark.parametrize("bundle_fixture", ["tiny_bundle", "tiny_bundle_322"])
def test_mixed_graph_stays_within_fp16_tolerances(
    bundle_fixture: str, request: pytest.FixtureRequest
) -> None:
    report = precision.mixed_parity(Bundle.open(request.getfixturevalue(bundle_fixture)))
    assert report.passed, report.failures
    assert report.min_global_cosine >= FP16["global_cosine"]
    assert report.count_agreement == 1.0 and report.position_agreement >= FP16["positions"]


def test_without_the_plan_fp16_changes_the_selected_regions(
    tiny_bundle_322: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: the same pass with nothing pinned fails the tolerances the plan meets."""
    planned = precision.plan_precision

    def nothing_pinned(model: Any) -> precision.PrecisionPlan:
        plan = planned(model)
        return replace(plan, fp32={}, fp16=tuple(plan.fp32) + plan.fp16)

    monkeypatch.setattr(precision, "plan_precision", nothing_pinned)
    report = precision.mixed_parity(Bundle.open(tiny_bundle_322))
    assert not report.passed and report.position_agreement < FP16["positions"]


# --- profiles, records and the refusals ----------------------------------------------------


def test_profiles_cover_batch_one_to_max() -> None:
    assert Profile.for_batch(8) == Profile(1, 8, 8)
    assert Profile.for_batch(8, opt_batch=2) == Profile(1, 2, 8)
    for bad in (
        {"max_batch": 0},
        {"max_batch": trt_record.MAX_BATCH + 1},
        {"max_batch": 4, "opt_batch": 5},
    ):
        with pytest.raises(UsageError, match="batch"):
            Profile.for_batch(**bad)


def fake_engines(
    bundle_dir: Path, tmp_path: Path, gpu: GpuInfo = HERE, max_batch: int = 8
) -> Bundle:
    """A copy of a bundle with engine files and records, as build-trt would leave them."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    bundle = Bundle.open(copy)
    records = {}
    for graph, spec in bundle.manifest.graphs.items():
        data = f"not a real {graph} engine".encode()
        (copy / trt_record.engine_file(graph, "fp16")).write_bytes(data)
        records[graph] = EngineRecord(
            graph=graph,
            file=trt_record.engine_file(graph, "fp16"),
            sha256="0" * 64,
            bytes=len(data),
            onnx_sha256=spec.sha256,
            tensorrt="10.13.0.35",
            gpu=gpu.name,
            compute_capability=gpu.compute_capability,
            precision="fp16",
            mode="constraints",
            profile=Profile.for_batch(max_batch),
            workspace_gib=None,
            fp32_nodes=12,
            built="2026-01-01T00:00:00+00:00",
        )
    trt_record.set_records(bundle.manifest, records)
    bundle.manifest.write(copy)
    return Bundle.open(copy)


def test_engine_records_round_trip_through_the_manifest(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = fake_engines(tiny_bundle, tmp_path)
    records = trt_record.read_records(bundle)
    assert set(records) == set(bundle.manifest.graphs)
    assert records["global"].profile == Profile(1, 8, 8)
    for record in records.values():
        trt_record.check_record(bundle, record, "10.13.0.35", HERE)
    assert bundle.manifest.fingerprint == Bundle.open(tiny_bundle).manifest.fingerprint


@pytest.mark.parametrize(
    ("tensorrt", "gpu", "what"),
    [
        ("10.3.0.30", HERE, "TensorRT 10.13.0.35"),
        ("10.13.0.35", GpuInfo("NVIDIA A100-SXM4-40GB", "8.0", "12.8"), "NVIDIA A100"),
        ("10.13.0.35", GpuInfo(HERE.name, "8.7", "12.6"), r"\(8.7\)"),
    ],
)
def test_engine_from_another_gpu_or_tensorrt_is_refused(
    tiny_bundle: Path, tmp_path: Path, tensorrt: str, gpu: GpuInfo, what: str
) -> None:
    bundle = fake_engines(tiny_bundle, tmp_path)
    record = trt_record.read_records(bundle)["global"]
    with pytest.raises(BundleError, match=what) as info:
        trt_record.check_record(bundle, record, tensorrt, gpu)
    message = str(info.value)
    assert (
        f"rebuild here with fol-infer build-trt {bundle.folder} --precision fp16 --max-batch 8"
        in message
    )


def test_stale_missing_or_truncated_engines_are_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = fake_engines(tiny_bundle, tmp_path)
    record = trt_record.read_records(bundle)["local"]
    with pytest.raises(BundleError, match="re-exported"):
        trt_record.check_record(
            bundle, replace(record, onnx_sha256="f" * 64), record.tensorrt, HERE
        )
    (bundle.folder / record.file).write_bytes(b"short")
    with pytest.raises(BundleError, match="changed or truncated"):
        trt_record.check_record(bundle, record, record.tensorrt, HERE)
    (bundle.folder / record.file).unlink()
    with pytest.raises(BundleError, match="missing: rebuild with fol-infer build-trt"):
        trt_record.check_record(bundle, record, record.tensorrt, HERE)


def test_bundle_without_engines_is_refused(tiny_bundle: Path) -> None:
    with pytest.raises(
        BundleError, match="no TensorRT engines: build them with fol-infer build-trt"
    ):
        trt_record.read_records(Bundle.open(tiny_bundle))


def test_batch_above_the_profile_maximum_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = fake_engines(tiny_bundle, tmp_path, max_batch=4)
    record = trt_record.read_records(bundle)["global"]
    trt_record.check_batch(4, record, bundle.folder)
    with pytest.raises(UsageError, match="batch of 5 images is above .* maximum of 4") as info:
        trt_record.check_batch(5, record, bundle.folder)
    assert "--max-batch 5" in str(info.value)
    with pytest.raises(UsageError, match="at least 1"):
        trt_record.check_batch(0, record, bundle.folder)


# --- a missing TensorRT, driver or GPU ------------------------------------------------------


def test_missing_tensorrt_names_the_packages(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # the import fails as if not installed
    monkeypatch.setattr(trt_library, "JETSON_RELEASE", tmp_path / "absent")
    monkeypatch.setattr(trt_record.ctypes, "CDLL", lambda name: FakeDriver(0))
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed") as info:
        trt_library.require_tensorrt()
    assert "tensorrt-cu12" in str(info.value) and "tensorrt-cu13" in str(info.value)
    monkeypatch.setattr(trt_record.ctypes, "CDLL", lambda name: FakeDriver(1))  # a CUDA 12.6 driver
    with pytest.raises(BackendUnavailableError, match="CUDA 12.6: pip install tensorrt-cu12"):
        trt_library.require_tensorrt()
    (tmp_path / "absent").write_text("# R36 (release), REVISION: 4.3\n")  # now a Jetson
    with pytest.raises(BackendUnavailableError, match="JetPack's TensorRT"):
        trt_library.require_tensorrt()


def test_type_stubs_alone_do_not_count_as_tensorrt() -> None:
    if tensorrt_installed():
        pytest.skip("TensorRT itself is installed here")
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("tensorrt-stubs is not installed here")
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        trt_library.require_tensorrt()


class FakeDriver:
    """libcuda's few entry points used by current_gpu, writing through ctypes.byref."""

    def __init__(self, devices: int) -> None:
        self.devices = devices

    @staticmethod
    def _set(ref: Any, value: Any) -> int:
        ref._obj.value = value
        return 0

    def cuDriverGetVersion(self, ref: Any) -> int:  # noqa: N802 (the driver's names)
        return self._set(ref, 12060)

    def cuInit(self, flags: int) -> int:  # noqa: N802
        return 0 if self.devices else 100  # CUDA_ERROR_NO_DEVICE

    def cuDeviceGetCount(self, ref: Any) -> int:  # noqa: N802
        return self._set(ref, self.devices)

    def cuDeviceGet(self, ref: Any, ordinal: int) -> int:  # noqa: N802
        return self._set(ref, ordinal)

    def cuDeviceGetName(self, buf: Any, size: int, dev: Any) -> int:  # noqa: N802
        buf.value = b"Orin (nvgpu)"
        return 0

    def cuDeviceGetAttribute(self, ref: Any, attr: int, dev: Any) -> int:  # noqa: N802
        return self._set(ref, {75: 8, 76: 7}[attr])


def test_gpu_identity_comes_from_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trt_record.ctypes, "CDLL", lambda name: FakeDriver(1))
    assert trt_record.current_gpu() == GpuInfo("Orin (nvgpu)", "8.7", "12.6")
    with pytest.raises(UsageError, match="GPU 3 does not exist"):
        trt_record.current_gpu(3)
    monkeypatch.setattr(trt_record.ctypes, "CDLL", lambda name: FakeDriver(0))
    with pytest.raises(BackendUnavailableError, match=r"driver \(CUDA 12.6\) sees no usable GPU"):
        trt_record.current_gpu()


def test_no_driver_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_library(name: str) -> ctypes.CDLL:
        raise OSError(name)

    monkeypatch.setattr(trt_record.ctypes, "CDLL", no_library)
    with pytest.raises(BackendUnavailableError, match="no NVIDIA driver found"):
        trt_record.current_gpu()


def test_trt_backend_here_says_what_is_missing(tiny_bundle: Path) -> None:
    if tensorrt_installed():
        pytest.skip("TensorRT is installed here: the GPU test covers the backend")
    from fol_infer.backends import open_encoder

    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        open_encoder(Bundle.open(tiny_bundle), "trt")


def test_build_checks_arguments_first_and_leaves_the_bundle_alone(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    from fol_infer.export.bundle_engines import EngineSettings, build_bundle_engines

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    for bad, match in (
        ({"precision": "int8"}, "--precision"),
        ({"max_batch": 0}, "--max-batch"),
        ({"workspace_gib": 0.0}, "--workspace"),
        ({"timing_cache": tmp_path}, "--timing-cache"),
    ):
        with pytest.raises(UsageError, match=match):
            build_bundle_engines(copy, EngineSettings(**bad))
    if not tensorrt_installed():
        with pytest.raises(BackendUnavailableError):
            build_bundle_engines(copy)
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in tiny_bundle.iterdir())
    assert Bundle.open(copy).manifest.engines == {}


def test_build_trt_command_exits_2_with_one_line(tiny_bundle: Path) -> None:
    from typer.testing import CliRunner

    from fol_infer.cli import (
        app,
        build_trt_command,  # noqa: F401  (registers build-trt)
    )

    runner = CliRunner()
    result = runner.invoke(app, ["build-trt", str(tiny_bundle), "--max-batch", "0"])
    assert result.exit_code == 2 and "Invalid value for '--max-batch'" in result.output
    result = runner.invoke(app, ["build-trt", str(tiny_bundle), "--max-batch", "2000"])
    assert result.exit_code == 2 and "--max-batch must be between 1 and 1024" in result.output
    if not tensorrt_installed():
        result = runner.invoke(app, ["build-trt", str(tiny_bundle)])
        assert result.exit_code == 2 and "TensorRT is not installed" in result.output
        assert result.output.count("error:") == 1 and "Traceback" not in result.output


def test_trt_modules_import_neither_torch_nor_tensorrt() -> None:
    code = (
        "import sys, fol_infer.backends.trt, fol_infer.cli.build_trt_command,"
        " fol_infer.export.precision;"
        "print(sorted({'torch', 'tensorrt'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- pure helpers around the TensorRT calls --------------------------------------------------


def test_failure_messages_name_the_node_and_the_remedy() -> None:
    problem = trt_build.ParseProblem(41, "node_topk_1", "TopK", "k exceeds the limit\n")
    message = trt_build.parse_failure_message(Path("b/local.onnx"), [problem, problem])
    assert (
        "local.onnx at node 'node_topk_1' (TopK, #41): k exceeds the limit (and 1 more" in message
    )
    memory = ["Tactic Device request: 9000MB Available: 1024MB. Device memory is insufficient"]
    assert "--workspace" in trt_build.build_failure_message(Path("g.onnx"), memory, 1.0)
    assert "--max-batch" in trt_build.build_failure_message(Path("g.onnx"), memory, None)
    assert "-v" in trt_build.build_failure_message(Path("g.onnx"), ["no implementation"], None)


def test_layers_map_back_to_onnx_nodes() -> None:
    outputs = {"mul_27": "node_mul_27"}
    fused = "[ONNX Layer: node_exp]\x1f[ONNX Layer: node_sum_2]"
    assert trt_pins.layer_nodes(fused, "x", [], outputs) == {"node_exp", "node_sum_2"}
    assert trt_pins.layer_nodes("", "node_mul_27", [], outputs) == {"node_mul_27"}
    assert trt_pins.layer_nodes("", "(Unnamed Layer* 3)", ["mul_27"], outputs) == {"node_mul_27"}
    assert trt_pins.layer_nodes("", "(Unnamed Layer* 4)", ["other"], outputs) == set()


def test_device_arrays_describe_themselves_for_zero_copy_consumers() -> None:
    from fol_infer.backends.trt import DeviceArray

    a = DeviceArray(ptr=0x7F00, shape=(2, 8448), dtype=np.dtype(np.float32), stream=77)
    cai = a.__cuda_array_interface__
    assert cai["data"] == (0x7F00, False) and cai["shape"] == (2, 8448)
    assert np.dtype(cai["typestr"]) == np.float32 and cai["version"] == 3 and cai["stream"] == 77
