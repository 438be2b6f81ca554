"""What machine and libraries a benchmark ran on: reports name them, so figures can be compared."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from typing import Any

from fol_infer import __version__
from fol_infer.bundle import Bundle

LIBRARIES = (
    "numpy",
    "onnxruntime",
    "onnxruntime-gpu",
    "faiss-cpu",
    "faiss-gpu-cu12",
    "torch",
    "triton",
    "tensorrt",
    "pillow",
)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_model() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def versions() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def describe(engine: str) -> dict[str, Any]:
    return {
        "fol_infer": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu_model(),
        "engine": engine,
        "libraries": versions(),
    }


def engine_precision(bundle: Bundle, engine: str) -> str:
    if engine == "trt":
        records: list[dict[str, Any]] = list(bundle.manifest.engines.values())
        return str(records[0].get("precision", "unknown")) if records else "not built"
    return "fp32"


def gpu_peak_mib() -> float | None:
    """Peak GPU memory torch allocated in this process, when torch and a GPU are in use."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return float(torch.cuda.max_memory_allocated()) / 2**20
