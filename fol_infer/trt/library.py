"""Loading TensorRT: its version (or what to install instead), and the process's one logger.

Targets TensorRT 10.x (JetPack 6 ships 10.3) and 11.x; every module of this package reaches
TensorRT through here first, so a missing or broken install is one clear message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fol_infer.errors import BackendUnavailableError, FolInferError

JETSON_RELEASE = Path("/etc/nv_tegra_release")  # present on L4T (JetPack) systems only


def install_hint() -> str:
    """Which package to install here: by the driver's CUDA version, and Jetson apart."""
    from fol_infer.trt.record import current_gpu

    if JETSON_RELEASE.exists():
        return (
            "on Jetson use JetPack's TensorRT (sudo apt install python3-libnvinfer "
            "python3-libnvinfer-dev), not a pip wheel"
        )
    try:
        cuda = current_gpu().cuda_driver
    except FolInferError:
        cuda = ""
    wheels = (
        "pip install tensorrt-cu12 (TensorRT 10.x, CUDA 12.x) or tensorrt-cu13 (TensorRT 10.13+ "
        "and 11.x, CUDA 13.x)"
    )
    if cuda.startswith("12."):
        return f"this driver supports CUDA {cuda}: pip install tensorrt-cu12 (TensorRT 10.x)"
    if cuda.startswith("13."):
        return (
            f"this driver supports CUDA {cuda}: pip install tensorrt-cu13 (TensorRT 10.13+, 11.x)"
        )
    return wheels + (f"; this driver supports CUDA {cuda}" if cuda else "")


def require_tensorrt() -> str:
    """The installed TensorRT version, or a BackendUnavailableError that says what to install."""
    try:
        import tensorrt as trt
    except ModuleNotFoundError:
        trt = None  # type: ignore[assignment]
    except (ImportError, OSError) as exc:  # installed, but its libraries do not load
        raise BackendUnavailableError(f"TensorRT does not load ({exc}): {install_hint()}") from None
    # The type stubs alone install an importable `tensorrt` namespace without the library.
    version = getattr(trt, "__version__", None) if hasattr(trt, "Builder") else None
    if not isinstance(version, str):
        raise BackendUnavailableError(f"TensorRT is not installed: {install_hint()}")
    return version


def major(version: str) -> int:
    return int(version.split(".")[0])


_LOGGER: Any = None


def logger() -> Any:
    """The process's one TensorRT logger, shared by every Builder, parser and Runtime.

    A new logger per object is reported to crash TensorRT 10.3 on JetPack 6 (NVIDIA/TensorRT
    #4134), and TensorRT keeps using the first one it was given anyway.

    It keeps warnings and errors for the messages raised here; `take` hands over those seen
    since the last call.
    """
    global _LOGGER
    if _LOGGER is not None:
        return _LOGGER
    import logging

    import tensorrt as trt

    log = logging.getLogger(__name__)

    class Capture(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.lines: list[str] = []

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                self.lines = [*self.lines[-99:], msg]
                log.warning("TensorRT: %s", msg)
            elif log.isEnabledFor(logging.DEBUG):
                log.debug("TensorRT: %s", msg)

        def take(self) -> list[str]:
            lines, self.lines = self.lines, []
            return lines

    _LOGGER = Capture()
    return _LOGGER
