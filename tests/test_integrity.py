"""Damaged files are named with the command that repairs them, never served, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from sample_images import make_images
from typer.testing import CliRunner

from fol_infer.backends import open_encoder
from fol_infer.bundle import Bundle
from fol_infer.cli import app
from fol_infer.errors import BundleError, DamagedFileError
from fol_infer.files import integrity
from fol_infer.files.user_cache import cache_dir
from fol_infer.index.build import BuildSettings, build_index
from fol_infer.index.database import FAISS_FILE, Database

runner = CliRunner()


def cli(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, " ".join(result.output.split())


def flip(path: Path, offset: int, keep_mtime: bool = False) -> None:
    """Flip one byte in place (same size), optionally putting the mtime back."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x20]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture()
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


@pytest.fixture()
def built(bundle_copy: Path, tmp_path: Path) -> Path:
    bundle = Bundle.open(bundle_copy)
    make_images(tmp_path / "db", 3)
    with open_encoder(bundle) as encoder:
        build_index(bundle, encoder, tmp_path / "db", tmp_path / "idx", BuildSettings(batch=2))
    return tmp_path / "idx"


def test_graph_with_flipped_weights_is_named_and_cache_skips_unchanged_files(
    bundle_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[str] = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    listing = sorted(p.name for p in bundle_copy.iterdir())
    Bundle.open(bundle_copy)
    assert sorted(hashed) == ["global.onnx", "local.onnx", "rerank.onnx"]  # cold: every graph
    hashed.clear()
    Bundle.open(bundle_copy)
    assert hashed == []  # warm: the cache vouches for them
    assert (cache_dir() / integrity.CACHE_FILE).is_file()
    assert sorted(p.name for p in bundle_copy.iterdir()) == listing  # nothing written there

    size = (bundle_copy / "global.onnx").stat().st_size
    flip(bundle_copy / "global.onnx", size // 2, keep_mtime=True)  # a weight, same size
    with pytest.raises(DamagedFileError, match=r"global\.onnx is damaged.*fol-infer export"):
        Bundle.open(bundle_copy)
    code, out = cli("index", bundle_copy, tmp_path, "--out", tmp_path / "idx")
    assert code == 2 and "global.onnx is damaged" in out and "fol-infer export" in out
    assert "Traceback" not in out and not (tmp_path / "idx").exists()
    Bundle.open(bundle_copy, verify="sizes")  # the explicit opt-out still opens it


def test_edited_resolution_is_refused_before_any_index_work(
    bundle_copy: Path, tmp_path: Path
) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["resolution"] = [224, 224]
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"disagrees with .*global\.onnx: it takes 210x224"):
        Bundle.open(bundle_copy)
    make_images(tmp_path / "db", 2)
    for args in (
        ("index", bundle_copy, tmp_path / "db", "--out", tmp_path / "idx"),
        ("encode", bundle_copy, tmp_path / "db", "--out", tmp_path / "f.npz"),
    ):
        code, out = cli(*args)
        assert code == 2 and "disagrees with" in out and "re-export" in out, out
        assert "Traceback" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "db"]  # nothing half-made
    manifest["resolution"] = [210, 224]
    manifest["graphs"]["local"]["inputs"][0]["shape"][1] = 32
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"input 'features' is float32 \['batch', 64"):
        Bundle.open(bundle_copy)


def test_flipped_faiss_file_is_named_with_its_repair(built: Path, bundle_copy: Path) -> None:
    path = built / FAISS_FILE
    flip(path, path.stat().st_size // 2, keep_mtime=True)
    with pytest.raises(DamagedFileError, match=r"global\.faiss is damaged: its sha256"):
        Database(built)
    code, out = cli("query", built, built.parent / "db", "--no-rerank")
    assert code == 2 and "global.faiss is damaged" in out and "fol-infer repair" in out, out
    assert "Traceback" not in out
    repair = out.split("Repair: ")[1].split(" (rebuilds")[0]
    args = [a.strip("'") for a in repair.split()[1:]]
    code, log = cli(*args)  # the repair command as printed
    assert code == 0, log
    with Database(built) as database:
        assert len(database.global_index) == 3
    code, out = cli("query", built, built.parent / "db", "--no-rerank")
    assert code == 0, out


def test_nan_bytes_in_tokens_are_named_not_a_traceback(built: Path) -> None:
    tokens = built / "tokens" / "tokens.bin"
    with open(tokens, "r+b") as f:  # fp16 NaN in every row of the first image
        for row in range(10):
            f.seek(row * 128 * 2)
            f.write(np.array([np.nan], np.float16).tobytes())
    code, out = cli("query", built, built.parent / "db", "--rerank-k", "3")
    assert code == 2, out
    assert "tokens.bin is damaged: image 0's rows hold NaN" in out
    assert "Traceback" not in out
    repair = out.split("Repair: ")[1].split()
    assert repair[:2] == ["fol-infer", "repair"]
    code, log = cli(*repair[1:])  # the repair command as printed: encodes the index again
    assert code == 0 and "encoded again" in log, log
    code, out = cli("query", built, built.parent / "db", "--rerank-k", "3")
    assert code == 0, out
