"""Index build, append, resume after kill -9, refusals: the database never serves a torn index."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sample_images import make_images

from fol_infer.backends import open_encoder
from fol_infer.bundle import Bundle
from fol_infer.errors import IndexStoreError, UsageError
from fol_infer.images import preprocess
from fol_infer.index.build import BuildSettings, build_index
from fol_infer.index.database import EXACT_TOKENS, METADATA, Database
from fol_infer.index.token_store import TokenStore


@pytest.fixture()
def encoder(tiny_bundle: Path):
    enc = open_encoder(Bundle.open(tiny_bundle), "onnx")
    yield enc
    enc.close()


def append_int8(bundle: Bundle, encoder, tmp_path: Path) -> None:
    """Append tmp_path/db to tmp_path/idx asking for int8 tokens."""
    settings = BuildSettings(tokens="int8")
    build_index(bundle, encoder, tmp_path / "db", tmp_path / "idx", settings, mode="append")


def test_build_records_everything_and_opens(tiny_bundle: Path, encoder, tmp_path: Path) -> None:
    db = tmp_path / "db"
    make_images(db / "sub", 5)
    (db / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (db / "notes.txt").write_text("not an image, not even looked at")
    bundle = Bundle.open(tiny_bundle)
    report = build_index(
        bundle, encoder, db, tmp_path / "idx", BuildSettings(batch=2, tokens="int8")
    )
    assert report.added == 5 and report.total == 5
    assert [p for p, _ in report.failures] == ["broken.jpg"]
    meta = json.loads((tmp_path / "idx" / METADATA).read_text())
    assert meta["bundle_sha256"] == bundle.manifest.fingerprint
    assert meta["settings"]["tokens"] == "int8" and meta["settings"]["complete"] is True
    assert meta["failures"][0][0] == "broken.jpg"
    with Database(tmp_path / "idx", bundle=bundle) as database:
        assert len(database) == 5 and database.paths[0].startswith("sub/")
        assert database.meta.utm is not None and database.meta.utm.shape == (5, 2)
        scores, ids = database.global_index.search(
            np.load(tiny_bundle / "reference.npz")["global"], 5
        )
        assert ids.shape == (2, 5) and np.all(np.diff(scores, axis=1) <= 1e-6)


def test_refusals(tiny_bundle: Path, tiny_bundle_322: Path, encoder, tmp_path: Path) -> None:
    bundle = Bundle.open(tiny_bundle)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no images found"):
        build_index(bundle, encoder, tmp_path / "empty", tmp_path / "idx")
    make_images(tmp_path / "db", 3)
    build_index(bundle, encoder, tmp_path / "db", tmp_path / "idx")
    with pytest.raises(UsageError, match="--append.*--force"):
        build_index(bundle, encoder, tmp_path / "db", tmp_path / "idx")
    other = Bundle.open(tiny_bundle_322)
    with pytest.raises(IndexStoreError, match="built by .*tiny.* but the engine is .*tiny-322"):
        Database(tmp_path / "idx", bundle=other)
    with pytest.raises(UsageError, match="tokens='fp16', not 'int8'"):
        append_int8(bundle, encoder, tmp_path)


def test_append_adds_only_new_images_and_force_rebuilds(
    tiny_bundle: Path, encoder, tmp_path: Path
) -> None:
    bundle = Bundle.open(tiny_bundle)
    make_images(tmp_path / "db", 3)
    build_index(bundle, encoder, tmp_path / "db", tmp_path / "idx")
    make_images(tmp_path / "db", 5, seed=0)  # same first three names and pixels + two new
    extra = make_images(tmp_path / "elsewhere", 1, seed=9)
    report = build_index(bundle, encoder, tmp_path / "db", tmp_path / "idx", mode="append")
    assert report.added == 2 and report.total == 5
    report = build_index(bundle, encoder, tmp_path / "elsewhere", tmp_path / "idx", mode="append")
    with Database(tmp_path / "idx") as database:
        assert len(database) == 6 and database.paths[-1] == str(extra[0].resolve())
        assert database.absolute_path(5) == extra[0].resolve()
    report = build_index(bundle, encoder, tmp_path / "db", tmp_path / "idx", mode="force")
    assert report.total == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db", "elsewhere", "idx"]


def test_faiss_file_catches_up_after_a_crash_between_commits(
    tiny_bundle: Path, encoder, tmp_path: Path
) -> None:
    bundle = Bundle.open(tiny_bundle)
    make_images(tmp_path / "db", 4)
    build_index(bundle, encoder, tmp_path / "db", tmp_path / "idx", BuildSettings(batch=2))
    (tmp_path / "idx" / "global.faiss").unlink()  # as if the process died before saving it
    with Database(tmp_path / "idx") as database:
        assert len(database.global_index) == 4


def _run_cli(*args: str | Path) -> subprocess.Popen[bytes]:
    code = "import sys; from fol_infer.cli import main; sys.argv[0] = 'fol-infer'; main()"
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def test_kill_9_mid_build_then_rerun_resumes(tiny_bundle: Path, tmp_path: Path) -> None:
    images = make_images(tmp_path / "db", 24, size=(64, 64))
    out = tmp_path / "idx"
    proc = _run_cli("index", tiny_bundle, tmp_path / "db", "--out", out, "--batch", "2")
    deadline = time.monotonic() + 120
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done = len(json.loads((out / METADATA).read_text())["paths"])
        except (OSError, ValueError):
            done = 0
        if done >= 6:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert 6 <= done < 24, f"could not interrupt the build (got to {done} images)"
    with pytest.raises(IndexStoreError, match="interrupted after"):
        Database(out)
    rerun = _run_cli("index", tiny_bundle, tmp_path / "db", "--out", out, "--batch", "2")
    log = rerun.communicate(timeout=300)[0].decode()
    assert rerun.returncode == 0, log
    assert "resumed" in log
    with Database(out) as database:
        assert sorted(database.paths) == sorted(p.name for p in images)
        assert len(database.tokens) == 24 and len(database.global_index) == 24


def test_int8_exact_keeps_float32_originals_in_step(
    tiny_bundle: Path, encoder, tmp_path: Path
) -> None:
    bundle = Bundle.open(tiny_bundle)
    images = make_images(tmp_path / "db", 4)
    settings = BuildSettings(batch=2, tokens="int8-exact")
    build_index(bundle, encoder, tmp_path / "db", tmp_path / "idx", settings)
    exact = TokenStore.open(tmp_path / "idx" / EXACT_TOKENS)
    try:  # a crash after the float32 store committed a batch the metadata never did
        exact.append([np.zeros((3, 128), np.float32)])
    finally:
        exact.close()
    with Database(tmp_path / "idx", bundle=bundle) as database:
        assert database.token_format == "int8-exact" and database.tokens.dtype == "int8"
        assert database.exact_tokens is not None and len(database.exact_tokens) == 4
        first = database.paths.index(images[0].name)
        got = database.exact_tokens.get([first])[0]
        want = encoder.encode(preprocess(images[0], bundle.resolution)[None]).token_list()[0]
        np.testing.assert_array_equal(got, want)
        codes, scales = database.tokens.get_quantized([first])[0]
        np.testing.assert_allclose(codes * scales[:, None], want, atol=float(scales.max()))
    with pytest.raises(UsageError, match="tokens='int8-exact', not 'int8'"):
        append_int8(bundle, encoder, tmp_path)
    shutil.rmtree(tmp_path / "idx" / EXACT_TOKENS)
    with pytest.raises(IndexStoreError, match=f"{EXACT_TOKENS}.*fol-infer repair"):
        Database(tmp_path / "idx")


def test_a_refused_index_leaves_no_store_open(
    tiny_bundle: Path, encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = Bundle.open(tiny_bundle)
    make_images(tmp_path / "db", 2)
    settings = BuildSettings(tokens="int8-exact")
    build_index(bundle, encoder, tmp_path / "db", tmp_path / "idx", settings)
    opened: list[TokenStore] = []
    real_open = TokenStore.open.__func__  # type: ignore[attr-defined]

    def spy(cls: type[TokenStore], *args: object, **kwargs: object) -> TokenStore:
        store = real_open(cls, *args, **kwargs)
        opened.append(store)
        return store

    def broken_faiss(*args: object) -> None:
        raise IndexStoreError("global.faiss is damaged")

    monkeypatch.setattr(TokenStore, "open", classmethod(spy))
    monkeypatch.setattr(Database, "_open_faiss", broken_faiss)
    with pytest.raises(IndexStoreError, match="damaged"):
        Database(tmp_path / "idx")
    assert len(opened) == 3  # descriptors, int8 tokens, float32 tokens
    for store in opened:
        with pytest.raises(IndexStoreError, match="is closed"):
            len(store)
