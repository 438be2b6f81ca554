"""Shared fixtures: tiny seeded checkpoints and bundles, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Triton fixes interpreter vs compiler at its first import in a process: without an NVIDIA
# GPU, kernels run through the interpreter (TRITON_INTERPRET=1), which is how CI tests them.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TINY_RESOLUTION = (210, 224)  # non-square, and 57 x 61 upsampled cells < 3600 (padding path)


def shared_data() -> Path:
    """The real photographs beside the checkout; tests that need them skip without them."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real photographs not found at {SHARED_DATA} (a user's own clone)")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def _user_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the verification cache and generated defaults out of the user's ~/.cache."""
    os.environ["FOL_INFER_CACHE"] = str(tmp_path_factory.mktemp("user-cache"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch", reason="checkpoints need PyTorch (pip install '.[export]')")
    from fol_infer.model.checkpoint import make_checkpoint

    return make_checkpoint("tiny", seed=0, out=tmp_path_factory.mktemp("ckpt") / "tiny.pth")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnx", reason="export needs onnx (pip install '.[export]')")
    from fol_infer.export.onnx import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    return export_bundle(tiny_checkpoint, out, TINY_RESOLUTION)


@pytest.fixture(scope="session")
def tiny_bundle_322(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The published default resolution: 89 x 89 cells, more than 3600 (TopK path)."""
    pytest.importorskip("onnx", reason="export needs onnx (pip install '.[export]')")
    from fol_infer.export.onnx import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-322"
    return export_bundle(tiny_checkpoint, out, 322)
