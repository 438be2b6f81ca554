"""The CPU runtime imports neither torch nor tensorrt (a ground rule of the package layout)."""

from __future__ import annotations

import subprocess
import sys

RUNTIME_MODULES = (
    "fol_infer.cli",
    "fol_infer.pipeline",
    "fol_infer.backends.onnx",
    "fol_infer.backends.trt",
    "fol_infer.index.database",
    "fol_infer.rerank",
    "fol_infer.images",
    "fol_infer.bench.harness",
    "fol_infer.export.opcheck",
    "fol_infer.export.precision",
    "fol_infer.export.bundle_engines",
    "fol_infer.encoding",
)


def test_runtime_modules_do_not_import_torch_or_tensorrt() -> None:
    code = (
        "import sys\n"
        f"for name in {RUNTIME_MODULES!r}: __import__(name)\n"
        "heavy = sorted(m for m in ('torch', 'tensorrt', 'triton') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "", f"imported at module level: {result.stdout.strip()}"
