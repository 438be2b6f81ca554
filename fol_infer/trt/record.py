"""TensorRT engine records in a bundle's manifest, and the checks made before one is loaded.

A serialized engine runs only with the TensorRT version that built it and on the GPU model it
was built for, so each record says which, and a mismatch is refused up front with the command
that rebuilds it, instead of TensorRT failing deep inside deserialization. Neither torch nor
tensorrt is needed here: the GPU is read through the CUDA driver library (ctypes).
"""

from __future__ import annotations

import ctypes
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fol_infer.bundle import MAX_BATCH, Bundle, Manifest
from fol_infer.choices import EngineBuildMode
from fol_infer.errors import BackendUnavailableError, BundleError, UsageError

_CC_MAJOR, _CC_MINOR = 75, 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_{MAJOR,MINOR}


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "8.7"
    cuda_driver: str  # newest CUDA version the driver supports, "12.6"


@dataclass(frozen=True)
class Profile:
    """An optimisation profile over the batch axis (the only dynamic axis of both graphs)."""

    min: int
    opt: int
    max: int

    @classmethod
    def for_batch(cls, max_batch: int, opt_batch: int | None = None) -> Profile:
        if not 1 <= max_batch <= MAX_BATCH:
            raise UsageError(f"--max-batch must be between 1 and {MAX_BATCH}, not {max_batch}")
        opt = max_batch if opt_batch is None else opt_batch
        if not 1 <= opt <= max_batch:
            raise UsageError(
                f"--opt-batch must be between 1 and --max-batch ({max_batch}), not {opt}"
            )
        return cls(min=1, opt=opt, max=max_batch)


@dataclass(frozen=True)
class EngineRecord:
    """What the manifest says about one engine file (manifest["engines"][graph])."""

    graph: str
    file: str
    sha256: str
    bytes: int
    onnx_sha256: str  # the graph it was built from: a re-export makes it stale
    tensorrt: str
    gpu: str
    compute_capability: str
    precision: str
    mode: EngineBuildMode
    profile: Profile
    workspace_gib: float | None
    fp32_nodes: int
    built: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineRecord:
        fields = dict(d)
        fields["profile"] = Profile(**fields["profile"])
        return cls(**fields)


def engine_file(graph: str, precision: str) -> str:
    return f"{graph}.{precision}.engine"


LAYERS_SUFFIX, PINS_SUFFIX = ".layers.json", ".pins.json"


def engine_files(engine: str) -> list[str]:
    """An engine file and the records beside it: the inspector's layers, the fp32 pins."""
    stem = Path(engine)
    return [engine, stem.with_suffix(LAYERS_SUFFIX).name, stem.with_suffix(PINS_SUFFIX).name]


def rebuild_command(folder: str | Path, record: EngineRecord) -> str:
    if record.graph == "rerank":  # its profile is over the chunk of candidates
        return f"fol-infer build-trt {shlex.quote(str(folder))} --rerank-chunk {record.profile.max}"
    cmd = f"fol-infer build-trt {shlex.quote(str(folder))} --precision {record.precision}"
    cmd += f" --max-batch {record.profile.max}"
    if record.profile.opt != record.profile.max:
        cmd += f" --opt-batch {record.profile.opt}"
    return cmd


def read_records(bundle: Bundle) -> dict[str, EngineRecord]:
    """Every graph's engine record; refuses a bundle without engines or with some missing."""
    folder = shlex.quote(str(bundle.folder))
    raw = bundle.manifest.engines
    missing = [g for g in bundle.manifest.graphs if g not in raw]
    if missing:
        what = (
            "no TensorRT engines"
            if len(missing) == len(bundle.manifest.graphs)
            else (f"no TensorRT engine for {', '.join(missing)}")
        )
        raise BundleError(
            f"bundle {bundle.folder} has {what}: build them with fol-infer build-trt {folder}"
        )
    try:
        return {g: EngineRecord.from_dict(raw[g]) for g in bundle.manifest.graphs}
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(
            f"{bundle.folder}/manifest.json has a malformed engine record ({exc!r}): "
            f"rebuild with fol-infer build-trt {folder}"
        ) from None


def set_records(manifest: Manifest, records: dict[str, EngineRecord]) -> None:
    manifest.engines = {g: r.to_dict() for g, r in records.items()}


def check_record(bundle: Bundle, record: EngineRecord, tensorrt: str, gpu: GpuInfo) -> None:
    """Refuse an engine this machine cannot load, saying why and how to rebuild it."""
    rebuild = rebuild_command(bundle.folder, record)
    path = bundle.folder / record.file
    if not path.is_file():
        raise BundleError(f"engine {path} is missing: rebuild with {rebuild}")
    if path.stat().st_size != record.bytes:
        raise BundleError(f"engine {path} was changed or truncated: rebuild with {rebuild}")
    if record.onnx_sha256 != bundle.manifest.source(record.graph).sha256:
        raise BundleError(
            f"engine {path} was built from an older {record.graph} graph (the bundle was "
            f"re-exported since): rebuild with {rebuild}"
        )
    built = (record.tensorrt, record.gpu, record.compute_capability)
    here = (tensorrt, gpu.name, gpu.compute_capability)
    if built != here:
        raise BundleError(
            f"engine {path} was built with TensorRT {record.tensorrt} for {record.gpu} "
            f"(compute capability {record.compute_capability}); this machine has TensorRT "
            f"{tensorrt} and {gpu.name} ({gpu.compute_capability}), and engines only load where "
            f"they were built: rebuild here with {rebuild}"
        )


def check_batch(batch: int, record: EngineRecord, folder: str | Path) -> None:
    if batch < record.profile.min:
        raise UsageError(f"batch of {batch} images: the {record.graph} engine needs at least 1")
    if batch > record.profile.max:
        raise UsageError(
            f"batch of {batch} images is above the {record.graph} engine's profile maximum of "
            f"{record.profile.max}: pass smaller batches, or rebuild with a larger --max-batch "
            f"(fol-infer build-trt {shlex.quote(str(folder))} --max-batch {batch})"
        )


def _libcuda() -> Any:
    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        return ctypes.CDLL(name)
    except OSError:
        raise BackendUnavailableError(
            f"no NVIDIA driver found ({name} does not load): TensorRT needs an NVIDIA GPU "
            "with its driver installed"
        ) from None


def current_gpu(device: int = 0) -> GpuInfo:
    """Name, compute capability and driver CUDA version of one GPU, from the driver API."""
    cuda = _libcuda()
    version = ctypes.c_int(0)
    cuda.cuDriverGetVersion(ctypes.byref(version))
    driver = f"{version.value // 1000}.{version.value % 1000 // 10}"
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        raise BackendUnavailableError(
            f"the NVIDIA driver (CUDA {driver}) sees no usable GPU: check nvidia-smi and "
            "CUDA_VISIBLE_DEVICES"
        )
    if not 0 <= device < count.value:
        raise UsageError(f"GPU {device} does not exist: this machine has {count.value}")
    handle = ctypes.c_int(0)
    cuda.cuDeviceGet(ctypes.byref(handle), device)
    name = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(name, len(name), handle)
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    cuda.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, handle)
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, handle)
    return GpuInfo(name.value.decode(), f"{major.value}.{minor.value}", driver)
