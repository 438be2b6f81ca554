"""GlobalIndex (FAISS, inner product) and IndexMetadata: search, factories, files, UTM names."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest

from fol_infer.errors import (
    BackendUnavailableError,
    DamagedFileError,
    IndexStoreError,
    UsageError,
)
from fol_infer.files.atomic import atomic_writer
from fol_infer.index import global_index
from fol_infer.index.global_index import GlobalIndex, gpu_available
from fol_infer.index.metadata import IndexMetadata
from fol_infer.positions import parse_utm

DIM = 64


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1)


def test_flat_is_exact_inner_product(rng: np.random.Generator) -> None:
    db, q = unit(rng, 500), unit(rng, 20)
    index = GlobalIndex.create(DIM, device="cpu")
    index.add(db[:123])
    index.add(db[123:])
    scores, ids = index.search(q, 10)
    s = q @ db.T
    want = np.argsort(-s, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(scores, np.take_along_axis(s, want, axis=1), rtol=0, atol=1e-5)
    assert ids.dtype == np.int64 and len(index) == 500


def test_hnsw_finds_each_database_image_itself(rng: np.random.Generator) -> None:
    db = unit(rng, 400)
    index = GlobalIndex.create(DIM, factory="HNSW32", device="cpu")
    index.add(db)
    index.set_search_params(ef_search=64)
    _, ids = index.search(db, 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(400))


def test_ivf_trains_on_the_first_big_enough_batches(rng: np.random.Generator) -> None:
    db, q = unit(rng, 400), unit(rng, 15)
    index = GlobalIndex.create(DIM, factory="IVF4,Flat", device="cpu")
    assert index.train_size == 39 * 4  # the rule: 39 x the cluster count
    index.add(db[:100])
    assert len(index) == 100 and not index._index.is_trained  # buffered, not lost
    index.add(db[100:200])
    assert index._index.is_trained and index._index.ntotal == 200
    index.add(db[200:])
    index.set_search_params(nprobe=4)  # every list: exact
    flat = GlobalIndex.create(DIM, device="cpu")
    flat.add(db)
    np.testing.assert_array_equal(index.search(q, 5)[1], flat.search(q, 5)[1])


def test_small_buffer_trains_at_search_time(rng: np.random.Generator) -> None:
    db = unit(rng, 60)
    index = GlobalIndex.create(DIM, factory="IVF4,Flat", device="cpu")
    index.add(db)  # fewer than train_size, more than the 4 clusters
    _, ids = index.search(db[:3], 1)
    assert index._index.is_trained and ids.shape == (3, 1)


def test_database_too_small_for_the_factory(rng: np.random.Generator) -> None:
    index = GlobalIndex.create(DIM, factory="IVF64,Flat", device="cpu")
    index.add(unit(rng, 10))
    with pytest.raises(UsageError, match=r"has 10 descriptors.*at least 64.*'Flat'"):
        index.search(unit(rng, 1), 1)


def test_k_larger_than_the_index(rng: np.random.Generator) -> None:
    index = GlobalIndex.create(DIM, device="cpu")
    index.add(unit(rng, 7))
    with pytest.raises(UsageError, match=r"k = 8 but the index holds 7 images"):
        index.search(unit(rng, 2), 8)
    with pytest.raises(UsageError, match=r"k = 0"):
        index.search(unit(rng, 2), 0)


def test_bad_arguments(rng: np.random.Generator) -> None:
    with pytest.raises(UsageError, match="cannot build factory 'Nonsense12'"):
        GlobalIndex.create(DIM, factory="Nonsense12")
    with pytest.raises(UsageError, match="device must be"):
        GlobalIndex.create(DIM, device="tpu")  # type: ignore[arg-type]
    index = GlobalIndex.create(DIM, factory="HNSW32", device="cpu")
    with pytest.raises(UsageError, match="has no nprobe setting"):
        index.set_search_params(nprobe=8)
    with pytest.raises(UsageError, match=r"shape \(3, 32\)"):
        index.add(unit(rng, 3, dim=32))
    bad = unit(rng, 2)
    bad[0, 0] = np.inf
    with pytest.raises(UsageError, match="infinite"):
        index.add(bad)


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "HNSW32", "SQfp16"])
def test_save_open_round_trip(tmp_path: Path, rng: np.random.Generator, factory: str) -> None:
    db, q = unit(rng, 300), unit(rng, 9)
    index = GlobalIndex.create(DIM, factory=factory, device="cpu")
    index.add(db)
    if factory.startswith("IVF"):
        index.set_search_params(nprobe=2)
    index.save(tmp_path / "g.idx")
    with GlobalIndex.open(tmp_path / "g.idx", verify="full", device="cpu") as back:
        assert (back.factory, back.dim, len(back)) == (factory, DIM, 300)
        for a, b in zip(back.search(q, 5), index.search(q, 5), strict=True):
            np.testing.assert_array_equal(a, b)  # search parameters travel with the file
    assert not list(tmp_path.glob("*.tmp"))  # no temporary left, hidden or not


def test_open_refuses_damaged_files(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "g.idx"
    index = GlobalIndex.create(DIM, device="cpu")
    index.add(unit(rng, 50))
    index.save(path)
    data = path.read_bytes()

    path.write_bytes(data[:-1000])
    with pytest.raises(IndexStoreError, match="torn"):
        GlobalIndex.open(path)

    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(flipped))
    GlobalIndex.open(path, verify="sizes", device="cpu")  # sizes alone cannot see it
    with pytest.raises(DamagedFileError, match="sha256"):
        GlobalIndex.open(path, verify="full")

    path.write_bytes(data.replace(b'"schema_version": 1', b'"schema_version": 7'))
    with pytest.raises(IndexStoreError, match=r"schema version 7.*reads version 1.*rebuild"):
        GlobalIndex.open(path)

    path.write_bytes(b"not an index at all")
    with pytest.raises(IndexStoreError, match="not a fol-infer global index"):
        GlobalIndex.open(path)
    with pytest.raises(IndexStoreError, match="missing"):
        GlobalIndex.open(tmp_path / "absent.idx")


def test_disk_full_during_save_keeps_the_previous_file(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "g.idx"
    index = GlobalIndex.create(DIM, device="cpu")
    index.add(unit(rng, 20))
    index.save(path)
    index.add(unit(rng, 20))

    def full(self: object, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(global_index._HashingWriter, "write", full)
    with pytest.raises(IndexStoreError, match="disk full while saving the global index"):
        index.save(path)
    monkeypatch.undo()
    assert len(GlobalIndex.open(path, verify="full", device="cpu")) == 20
    assert not list(tmp_path.glob("*.tmp"))  # no temporary left, hidden or not


@pytest.mark.skipif(gpu_available(), reason="checks the error shown where FAISS has no GPU")
def test_gpu_requested_without_gpu_faiss() -> None:
    with pytest.raises(BackendUnavailableError, match="faiss-gpu"):
        GlobalIndex.create(DIM, device="gpu")
    assert GlobalIndex.create(DIM, device="auto").device == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs GPU FAISS and a CUDA GPU")
def test_gpu_search_matches_cpu(rng: np.random.Generator) -> None:
    db, q = unit(rng, 1000), unit(rng, 30)
    cpu = GlobalIndex.create(DIM, device="cpu")
    gpu = GlobalIndex.create(DIM, device="gpu")
    for index in (cpu, gpu):
        index.add(db)
    np.testing.assert_array_equal(gpu.search(q, 10)[1], cpu.search(q, 10)[1])
    assert gpu.device == "gpu"
    hnsw = GlobalIndex.create(DIM, factory="HNSW32", device="gpu")
    hnsw.add(db)
    hnsw.search(q, 3)
    assert hnsw.device == "cpu"  # FAISS has no GPU HNSW: it stays on the CPU


# --------------------------------------------------------------------- metadata
@pytest.mark.parametrize(
    "path,expected",
    [
        ("db/@0543256.96@4178906.29@10@S@037.75@-122.45@x@@@@@@@.jpg", (543256.96, 4178906.29)),
        ("/abs/q/@585016.71@4477080.89@18@T@.jpg", (585016.71, 4477080.89)),
        ("@1@2@", (1.0, 2.0)),
        ("db/db3.jpg", None),
        ("db/@only-one@.jpg", None),
        ("db/@abc@def@.jpg", None),
        ("db/@nan@1@.jpg", None),
        ("@0543256.96@/x.jpg", None),  # coordinates live in the file name, not the folders
    ],
)
def test_parse_utm(path: str, expected: tuple[float, float] | None) -> None:
    assert parse_utm(path) == expected


def test_metadata_round_trip_and_utm(tmp_path: Path) -> None:
    meta = IndexMetadata(root=str(tmp_path), bundle_sha256="ab" * 32, bundle_name="vitb-322")
    meta.add_images([tmp_path / "d" / "@10@20@.jpg", "d/plain.jpg"])
    meta.failures.append(("d/broken.jpg", "cannot decode: truncated JPEG"))
    meta.settings = {"factory": "Flat", "tokens": "fp16", "resolution": [322, 322]}
    meta.save(tmp_path / "meta.json")
    back = IndexMetadata.load(tmp_path / "meta.json")
    assert back == meta
    assert back.paths == ["d/@10@20@.jpg", "d/plain.jpg"]
    utm = back.utm
    assert utm is not None
    np.testing.assert_array_equal(utm[0], [10, 20])
    assert np.isnan(utm[1]).all()
    assert IndexMetadata(root="/", bundle_sha256="x", paths=["a.jpg"]).utm is None
    meta.add_images([tmp_path.parent / "elsewhere.jpg"])  # appended from another folder
    assert meta.paths[-1] == (tmp_path.parent / "elsewhere.jpg").as_posix()


def test_metadata_refuses_another_bundle_and_schema(tmp_path: Path) -> None:
    meta = IndexMetadata(root="/db", bundle_sha256="1" * 64, bundle_name="vitl-504")
    meta.check_bundle("1" * 64)
    with pytest.raises(IndexStoreError, match=r"built by vitl-504 .*111111111111.* is vitb-322 "):
        meta.check_bundle("2" * 64, "vitb-322")
    meta.save(tmp_path / "m.json")
    obj = json.loads((tmp_path / "m.json").read_text())
    obj["schema_version"] = 5
    (tmp_path / "m.json").write_text(json.dumps(obj))
    with pytest.raises(IndexStoreError, match="schema version 5"):
        IndexMetadata.load(tmp_path / "m.json")
    (tmp_path / "m.json").write_text('{"format": "fol-infer-index-metadata", "schema_ver')
    with pytest.raises(IndexStoreError, match="unreadable"):
        IndexMetadata.load(tmp_path / "m.json")


def test_atomic_writer_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_writer(target) as f:
        f.write(b"new but never finished")
        raise RuntimeError("crash")
    assert target.read_bytes() == b"old"
    assert not list(tmp_path.glob("*.tmp"))
