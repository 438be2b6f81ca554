"""Sharded maps without Ray: same ids, paths, bytes and answers as the single index."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fol_infer.cli import app
from fol_infer.errors import IndexStoreError, UsageError
from fol_infer.index.database import DESCRIPTORS, EXACT_TOKENS, METADATA, TOKENS
from fol_infer.index.metadata import IndexMetadata
from fol_infer.index.shards import MapManifest, merge_top_k, name_key, plan_ranges
from fol_infer.index.token_store import TokenStore
from fol_infer.pipeline import Retriever

runner = CliRunner()
FORMATS = ["fp16", "int8", "int8-exact"]


def run(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


# ------------------------------------------------------------------------ the exact merge
@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 7), min_size=1, max_size=5),
    nq=st.integers(1, 4),
    k=st.integers(1, 30),
    seed=st.integers(0, 2**16),
)
def test_merge_equals_faiss_index_shards(sizes: list[int], nq: int, k: int, seed: int) -> None:
    """Small-integer vectors make many ties; k beyond the total makes padding; 0-size shards."""
    import faiss

    rng = np.random.default_rng(seed)
    d = 4
    reference = faiss.IndexShards(d, False, True)  # successive_ids=True
    subs, parts, offset = [], [], 0
    q = rng.integers(0, 3, (nq, d)).astype(np.float32)
    for n in sizes:
        sub = faiss.IndexFlatIP(d)
        if n:
            sub.add(rng.integers(0, 3, (n, d)).astype(np.float32))
            s, i = sub.search(q, min(k, n))
            parts.append((s, np.where(i >= 0, i + offset, -1)))
        subs.append(sub)
        reference.add_shard(sub)
        offset += n
    want_scores, want_ids = reference.search(q, k)
    scores, ids = merge_top_k(parts, k, nq)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(scores, want_scores)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text("ab-./ !_é", min_size=1, max_size=6), min_size=1, max_size=12))
def test_name_key_orders_names_as_the_file_list_does(parts: list[str]) -> None:
    """A map's shard ranges are checked by `name_key`: it must order names exactly as
    `find_images` orders the files (path components, separators first)."""
    import tempfile

    from fol_infer.images import find_images

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i, part in enumerate(parts):
            clean = "/".join(p for p in part.split("/") if p not in ("", ".", "..")) or "x"
            path = root / f"{clean}{i}.jpg"
            if path.exists() or any(parent.is_file() for parent in path.parents):
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
        files = [f.relative_to(root).as_posix() for f in find_images([root])]
    assert files == sorted(files, key=name_key)


def test_plan_ranges_are_contiguous_whole_batches() -> None:
    ranges = plan_ranges(40, 3, 4)
    assert [(r.start, r.stop) for r in ranges] == [(0, 16), (16, 28), (28, 40)]
    assert [(r.start, r.stop) for r in plan_ranges(10, 3, 4)] == [(0, 4), (4, 8), (8, 10)]
    with pytest.raises(UsageError, match="at least 1"):
        plan_ranges(40, 0, 4)
    with pytest.raises(UsageError, match="more than the 40 images"):
        plan_ranges(40, 41, 4)
    with pytest.raises(UsageError, match="make 10 batches"):
        plan_ranges(40, 11, 4)


# ------------------------------------------------------------------------ map == index
def _rows(folder: Path, store: str) -> list[bytes]:
    with TokenStore.open(folder / store) as s:
        if s.dtype == "int8":
            return [c.tobytes() + sc.tobytes() for c, sc in s.get_quantized(range(len(s)))]
        return [r.tobytes() for r in s.get(range(len(s)))]


@pytest.mark.parametrize("tokens", FORMATS)
def test_map_stores_what_the_single_index_stores(map_builds, tokens: str) -> None:
    single, sharded = map_builds.get(tokens), map_builds.get(tokens, shards=3)
    manifest = MapManifest.load(sharded)
    assert manifest.complete and [s.files for s in manifest.shards] == [16, 12, 12]
    meta = IndexMetadata.load(single / METADATA)
    shard_metas = [IndexMetadata.load(sharded / s.name / METADATA) for s in manifest.shards]
    assert [p for m in shard_metas for p in m.paths] == meta.paths
    assert sorted(f for m in shard_metas for f in m.failures) == sorted(meta.failures)
    assert len(meta.paths) == 38 and len(meta.failures) == 2
    assert [s.offset for s in manifest.shards] == [
        0,
        16,
        27,
    ]  # one unreadable file each in shards 1 and 2
    stores = [DESCRIPTORS, TOKENS] + ([EXACT_TOKENS] if tokens == "int8-exact" else [])
    for store in stores:
        rows = [r for s in manifest.shards for r in _rows(sharded / s.name, store)]
        assert rows == _rows(single, store), store


def _query_json(index: Path, queries: list[Path], *extra: str) -> str:
    """The JSON on stdout (a once-per-process note on stderr is not part of the answer)."""
    result = runner.invoke(app, ["query", str(index), *map(str, queries), "--json", *extra])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("tokens", FORMATS)
def test_map_answers_as_the_single_index(map_builds, tokens: str) -> None:
    """One query re-ranking 10 candidates, 8 re-ranking 2 each (re-ranking costs ~0.1 s per
    pair here), and a batch of 24 in one call, where FAISS scores 16+ queries together."""
    single, sharded = map_builds.get(tokens), map_builds.get(tokens, shards=3)
    one, batch = map_builds.queries[:1], map_builds.queries
    wide = ("--top-k", "10", "--rerank-k", "10")
    assert _query_json(sharded, one, *wide) == _query_json(single, one, *wide)
    narrow = ("--top-k", "12", "--rerank-k", "2")
    answer = _query_json(single, batch[:8], *narrow)
    assert _query_json(sharded, batch[:8], *narrow) == answer
    assert all(r["reranked"] for r in json.loads(answer)), "re-ranking must be compared"
    answers = []
    for index in (single, sharded):
        with Retriever(map_builds.bundle, index) as retriever:
            results = retriever.query(batch, top_k=38, rerank=False)
        answers.append(json.dumps([r.to_json() for r in results]))
    assert answers[0] == answers[1]


@pytest.mark.slow
def test_trained_factory_shares_one_quantizer(map_builds) -> None:
    single = map_builds.get(factory="IVF4,Flat")
    sharded = map_builds.get(factory="IVF4,Flat", shards=3)
    assert (sharded / "quantizer.faiss").is_file()
    queries = map_builds.queries[:6]
    assert _query_json(sharded, queries, "--no-rerank") == _query_json(
        single, queries, "--no-rerank"
    )


def test_graph_factories_are_flagged_approximate(map_builds, tmp_path: Path) -> None:
    code, out = run(
        "index", map_builds.bundle, map_builds.db, "--out", tmp_path / "m",
        "--shards", "2", "--faiss", "HNSW8", "--batch", "8",
    )  # fmt: skip
    assert code == 0, out
    assert "approximate" in out and MapManifest.load(tmp_path / "m").approximate
    assert not MapManifest.load(map_builds.get(shards=3)).approximate


# ------------------------------------------------------------------------ resume, append, refusals
class _Crash(Exception):
    pass


def test_interrupted_build_is_not_served_and_resumes_to_the_same_bytes(
    map_builds, tmp_path: Path
) -> None:
    from fol_infer.backends import open_encoder
    from fol_infer.bundle import Bundle
    from fol_infer.index.build import BuildSettings
    from fol_infer.index.map_build import LocalRunner, build_map

    bundle, out = Bundle.open(map_builds.bundle), tmp_path / "map"
    settings = BuildSettings(batch=4)
    with open_encoder(bundle, "onnx") as encoder:
        batches = []

        def crash_in_second_shard(n: int, total: int) -> None:
            batches.append(n)
            if len(batches) == 6:  # shard 0 has 4 batches: this is shard 1's second
                raise _Crash

        with pytest.raises(_Crash):
            build_map(bundle, map_builds.db, out, LocalRunner(encoder), settings, 3, "new",
                      crash_in_second_shard)  # fmt: skip
        with pytest.raises(IndexStoreError, match="not complete"):
            Retriever(bundle, out)
        code, msg = run("index", map_builds.bundle, map_builds.db, "--out", out, "--append")
        assert code == 2 and "not complete" in msg and "without --append" in msg
        with pytest.raises(UsageError, match="--shards 3"):
            build_map(bundle, map_builds.db, out, LocalRunner(encoder), settings, 2)
        build_map(bundle, map_builds.db, out, LocalRunner(encoder), settings)
    reference = map_builds.get(shards=3)
    for s in MapManifest.load(reference).shards:
        for store in (DESCRIPTORS, TOKENS):
            assert _rows(out / s.name, store) == _rows(reference / s.name, store)
    assert MapManifest.load(out).shards == MapManifest.load(reference).shards


@pytest.mark.slow
def test_append_adds_shards_like_a_single_index_append(map_builds, tmp_path: Path) -> None:
    from sample_images import make_images

    db = tmp_path / "db"
    shutil.copytree(map_builds.db, db)
    index, sharded = tmp_path / "idx", tmp_path / "map"
    bundle = map_builds.bundle
    assert run("index", bundle, db, "--out", index, "--batch", "4")[0] == 0
    assert run("index", bundle, db, "--out", sharded, "--shards", "3", "--batch", "4")[0] == 0
    make_images(db / "c", 9, seed=8)
    assert run("index", bundle, db, "--out", index, "--append", "--batch", "4")[0] == 0
    code, out = run(
        "index", bundle, db, "--out", sharded, "--append", "--shards", "2", "--batch", "4"
    )
    assert code == 0, out
    manifest = MapManifest.load(sharded)
    assert len(manifest.shards) == 5 and manifest.images == 47
    queries, depth = map_builds.queries[:3], ("--rerank-k", "5")
    assert _query_json(sharded, queries, *depth) == _query_json(index, queries, *depth)


def test_bad_input_is_named(map_builds, tiny_bundle_322: Path, tmp_path: Path) -> None:
    bundle, db = map_builds.bundle, map_builds.db
    for n, message in (("0", "Invalid value for '--shards'"), ("41", "more than the 40 images")):
        code, out = run("index", bundle, db, "--out", tmp_path / "x", "--shards", n)
        assert code == 2 and message in out, out
        assert not (tmp_path / "x").exists()  # a refused plan leaves no folder behind
    sharded = tmp_path / "map"
    shutil.copytree(map_builds.get(shards=3), sharded)
    code, out = run("query", sharded, map_builds.queries[0], "--bundle", tiny_bundle_322)
    assert code == 2 and "this map was built by" in out
    code, out = run("index", tiny_bundle_322, db, "--out", sharded, "--append")
    assert code == 2 and "this map was built by" in out
    tokens = sharded / "shard-00001" / TOKENS / "tokens.bin"
    with open(tokens, "r+b") as f:
        f.truncate(100)
    code, out = run("query", sharded, map_builds.queries[0])
    assert code == 2 and "shard-00001 (global ids 16..26)" in out and "tokens.bin" in out
    shutil.rmtree(sharded)
    shutil.copytree(map_builds.get(shards=3), sharded)
    shutil.rmtree(sharded / "shard-00002")
    with Retriever(bundle, sharded) as retriever:  # a shard down is named by the query
        with pytest.raises(IndexStoreError, match=r"shard-00002 \(global ids 27..37\).*missing"):
            retriever.query(map_builds.queries[:1])


def test_ray_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from fol_infer.distributed import require_ray
    from fol_infer.errors import BackendUnavailableError

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets without the extra
    with pytest.raises(BackendUnavailableError, match=r'pip install "fol-infer\[ray\]"'):
        require_ray()


def test_force_replaces_only_a_map(map_builds, tmp_path: Path) -> None:
    bundle, db = map_builds.bundle, map_builds.db
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, out = run("index", bundle, db, "--out", mine, "--shards", "3", "--force")
    assert code == 2 and "not a fol-infer map" in out, out
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert (mine / "notes.txt").read_text() == "keep"
    before = sorted(p.name for p in db.rglob("*"))
    code, out = run("index", bundle, db, "--out", db / "a", "--shards", "3", "--force")
    assert code == 2 and "is inside the database" in out, out
    assert sorted(p.name for p in db.rglob("*")) == before
    sharded = tmp_path / "map"
    shutil.copytree(map_builds.get(shards=3), sharded)
    original = {p.relative_to(sharded): p.read_bytes() for p in sharded.rglob("*.bin")}
    code, out = run(
        "index", bundle, db, "--out", sharded, "--shards", "3", "--batch", "4", "--force"
    )
    assert code == 0, out
    assert {p.relative_to(sharded): p.read_bytes() for p in sharded.rglob("*.bin")} == original


def test_in_process_build_progress_counts_the_whole_map(monkeypatch) -> None:
    """Each shard job reports against its own size; the bar must show the whole build."""
    from types import SimpleNamespace

    from fol_infer.index import map_build

    def one_shard(job, encoder, progress) -> None:
        progress(len(job.files), len(job.files))

    monkeypatch.setattr(map_build, "run_shard_job", one_shard)
    seen: list[tuple[int, int | None]] = []
    jobs = [SimpleNamespace(files=("a", "b")), SimpleNamespace(files=("c",))]
    map_build.LocalRunner(None).run(jobs, lambda n, total=None: seen.append((n, total)))  # type: ignore[arg-type]
    assert seen == [(2, 3), (1, 3)]
