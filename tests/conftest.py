"""Shared fixtures: tiny seeded checkpoints and bundles, built once per test session."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

# Triton fixes interpreter vs compiler at its first import in a process: without an NVIDIA
# GPU, kernels run through the interpreter (TRITON_INTERPRET=1), which is how CI tests them.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Ray clusters the tests start (in this process, in subprocesses, `ray start`) listen on
# 127.0.0.1 only: Ray 2.x turns a --node-ip-address of 127.0.0.1 into the machine's address
# and binds its servers to every interface, except in its single-machine mode, which this
# variable (read when ray is imported) selects.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Tables and messages are checked for their text: long temporary paths must not wrap at 80
# columns (rich reads COLUMNS once, when a console is made).
os.environ.setdefault("COLUMNS", "250")

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


def built_once(factory: pytest.TempPathFactory, name: str, make: Callable[[Path], object]) -> Path:
    """`make(path)` once per test run: pytest-xdist's workers share what the first one made
    (each would otherwise export the same tiny bundles again). `make` must create `path`
    whole or not at all (the product's own writes are atomic)."""
    from filelock import FileLock

    base = factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's folder, above every worker's own
    path = base / "built-once" / name
    path.parent.mkdir(exist_ok=True)
    with FileLock(f"{path}.lock"):
        if not path.exists():
            make(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch", reason="checkpoints need PyTorch (pip install '.[export]')")
    from fol_infer.model.checkpoint import make_checkpoint

    return built_once(tmp_path_factory, "tiny.pth", lambda out: make_checkpoint("tiny", 0, out))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnx", reason="export needs onnx (pip install '.[export]')")
    from fol_infer.export.onnx import export_bundle

    def export(out: Path) -> None:
        export_bundle(tiny_checkpoint, out, TINY_RESOLUTION)

    return built_once(tmp_path_factory, "tiny", export)


@pytest.fixture(scope="session")
def tiny_bundle_322(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The published default resolution: 89 x 89 cells, more than 3600 (TopK path)."""
    pytest.importorskip("onnx", reason="export needs onnx (pip install '.[export]')")
    from fol_infer.export.onnx import export_bundle

    def export(out: Path) -> None:
        export_bundle(tiny_checkpoint, out, 322)

    return built_once(tmp_path_factory, "tiny-322", export)


class MapBuilds:
    """The ~40-image database (two unreadable files) and its indexes and maps, each built
    once per run on first use (shared by pytest-xdist's workers, `built_once`): single index
    vs sharded map comparisons share them."""

    def __init__(self, bundle: Path, factory: pytest.TempPathFactory) -> None:
        self.bundle, self.factory = bundle, factory
        root = built_once(factory, "map-images", self._draw)
        self.db, self.queries = root / "db", sorted((root / "queries").glob("*.jpg"))

    @staticmethod
    def _draw(root: Path) -> None:
        from sample_images import make_images

        work = root.with_name(root.name + ".drawing")
        shutil.rmtree(work, ignore_errors=True)
        make_images(work / "db" / "a", 20, seed=3)
        make_images(work / "db" / "b", 18, seed=4)
        (work / "db" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
        (work / "db" / "b" / "empty.png").write_bytes(b"")
        make_images(work / "queries", 24, seed=5)
        work.rename(root)

    def get(self, tokens: str = "fp16", factory: str = "Flat", shards: int = 0) -> Path:
        """An index (shards=0) or a map of `shards` shards, batch 4."""
        name = f"{tokens}-{factory.replace(',', '_')}-{shards}"
        return built_once(self.factory, name, lambda out: self._build(out, tokens, factory, shards))

    def _build(self, out: Path, tokens: str, factory: str, shards: int) -> None:
        """Built beside `out` and renamed into place, so a failed build leaves no `out`."""
        from fol_infer.backends import open_encoder
        from fol_infer.bundle import Bundle
        from fol_infer.index.build import BuildSettings, build_index
        from fol_infer.index.map_build import LocalRunner, build_map

        bundle = Bundle.open(self.bundle)
        settings = BuildSettings(factory=factory, tokens=tokens, batch=4)  # type: ignore[arg-type]
        work = out.with_name(out.name + ".building")
        shutil.rmtree(work, ignore_errors=True)
        with open_encoder(bundle, "onnx") as encoder:
            if shards:
                build_map(bundle, self.db, work, LocalRunner(encoder), settings, shards)
            else:
                build_index(bundle, encoder, self.db, work, settings)
        work.rename(out)


@pytest.fixture(scope="session")
def map_builds(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> MapBuilds:
    return MapBuilds(tiny_bundle, tmp_path_factory)
