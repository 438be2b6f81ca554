"""TokenStore: round trips, crash safety (torn tails, kill -9), verification, disk full."""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from fol_infer.choices import StoreDtype
from fol_infer.errors import DamagedFileError, IndexStoreError, UsageError
from fol_infer.index import metadata, token_store
from fol_infer.index.token_store import TokenStore, quantize_int8

REPO = Path(__file__).resolve().parents[1]


def unit_rows(rng: np.random.Generator, n: int, dim: int = 128) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def lists(rng: np.random.Generator, counts: list[int]) -> list[np.ndarray]:
    return [unit_rows(rng, n) for n in counts]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_fp16_round_trip_with_variable_counts(tmp_path: Path, rng: np.random.Generator) -> None:
    a, b = lists(rng, [5, 0, 3600, 1]), lists(rng, [0, 7])
    with TokenStore.create(tmp_path / "s") as store:
        assert store.append(a) == range(0, 4)
        assert store.append(b) == range(4, 6)
    with TokenStore.open(tmp_path / "s", verify="full") as store:
        assert len(store) == 6
        np.testing.assert_array_equal(store.counts, [len(t) for t in a + b])
        got = store.get([5, 0, 2, 1, 4])
        for g, want in zip(got, [b[1], a[0], a[2], a[1], b[0]], strict=True):
            assert g.dtype == np.float16 and g.shape == want.shape
            np.testing.assert_array_equal(g, want.astype(np.float16))


def test_int8_round_trip_error_bound(tmp_path: Path, rng: np.random.Generator) -> None:
    tokens = lists(rng, [300, 0, 17])
    tokens[0][3] = 0.0  # an all-zero row must survive (scale 0)
    with TokenStore.create(tmp_path / "s", dtype="int8") as store:
        store.append(tokens)
        got = store.get(range(3))
    for g, want in zip(got, tokens, strict=True):
        assert g.dtype == np.float32 and g.shape == want.shape
        # int8 rounding is at most half a step, max|x| / 254 (plus float32 rounding).
        step = np.abs(want).max(axis=1, initial=0.0) / 127
        assert np.all(np.abs(g - want) <= step[:, None] / 2 * (1 + 1e-5) + 1e-7)
    np.testing.assert_array_equal(got[0][3], 0)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
def test_get_rows_picks_rows_as_get_returns_them(
    tmp_path: Path, rng: np.random.Generator, dtype: StoreDtype
) -> None:
    tokens = lists(rng, [6, 0, 40])
    with TokenStore.create(tmp_path / "s", dtype=dtype) as store:
        store.append(tokens)
        whole = store.get([2])[0]
        rows = np.array([0, 7, 8, 39])
        np.testing.assert_array_equal(store.get_rows(2, rows), whole[rows])
        assert store.get_rows(1, np.zeros(0, int)).shape == (0, 128)
        with pytest.raises(IndexError, match="rows 0..6 of image 0: it has 6"):
            store.get_rows(0, np.array([0, 6]))
        with pytest.raises(IndexError, match="id 3 out of range"):
            store.get_rows(3, rows)


def test_get_quantized_returns_the_stored_codes(tmp_path: Path, rng: np.random.Generator) -> None:
    tokens = lists(rng, [5, 0])
    with TokenStore.create(tmp_path / "s", dtype="int8") as store:
        store.append(tokens)
        (codes, scales), (none, no_scales) = store.get_quantized([0, 1])
    want_codes, want_scales = quantize_int8(tokens[0])
    np.testing.assert_array_equal(codes, want_codes)
    np.testing.assert_array_equal(scales, want_scales)
    assert none.shape == (0, 128) and none.dtype == np.int8 and no_scales.shape == (0,)
    with TokenStore.create(tmp_path / "f", dtype="fp16") as store:
        store.append(tokens)
        with pytest.raises(UsageError, match="stores fp16 tokens, not int8"):
            store.get_quantized([0])


def test_quantize_int8_uses_full_range(rng: np.random.Generator) -> None:
    q, scale = quantize_int8(unit_rows(rng, 50))
    np.testing.assert_array_equal(np.abs(q.astype(np.int32)).max(axis=1), 127)
    assert scale.dtype == np.float32


def test_fp32_store_is_exact(tmp_path: Path, rng: np.random.Generator) -> None:
    tokens = lists(rng, [9, 4])
    with TokenStore.create(tmp_path / "s", dtype="fp32") as store:
        store.append(tokens)
        for g, want in zip(store.get([0, 1]), tokens, strict=True):
            np.testing.assert_array_equal(g, want)


def test_bytes_per_image_counts_true_rows_only(tmp_path: Path, rng: np.random.Generator) -> None:
    counts = [3000, 3400, 3600]
    cases: list[tuple[StoreDtype, int]] = [("fp16", 128 * 2), ("int8", 128 + 4)]
    for dtype, row_bytes in cases:
        with TokenStore.create(tmp_path / dtype, dtype=dtype) as store:
            store.append(lists(rng, counts))
            expected = (sum(counts) * row_bytes + 8 * len(counts) + 32) / len(counts)
            assert store.bytes_per_image == expected


def test_empty_store_and_empty_append(tmp_path: Path) -> None:
    with TokenStore.create(tmp_path / "s") as store:
        assert len(store) == 0 and store.bytes_per_image == 0.0
        assert store.append([]) == range(0, 0)
        assert store.append([np.zeros((0, 128), np.float32)]) == range(0, 1)
        assert store.get([0])[0].shape == (0, 128)
    assert len(TokenStore.open(tmp_path / "s", verify="full")) == 1


def test_bad_inputs(tmp_path: Path, rng: np.random.Generator) -> None:
    with pytest.raises(UsageError, match="dtype"):
        TokenStore.create(tmp_path / "x", dtype="bf16")  # type: ignore[arg-type]
    with TokenStore.create(tmp_path / "s") as store:
        with pytest.raises(UsageError, match=r"token list 1 has shape \(3, 64\)"):
            store.append([unit_rows(rng, 2), unit_rows(rng, 3, dim=64)])
        bad = unit_rows(rng, 2)
        bad[1, 5] = np.nan
        with pytest.raises(UsageError, match="NaN"):
            store.append([bad])
        assert len(store) == 0
        with pytest.raises(IndexError, match="out of range"):
            store.get([0])
    with pytest.raises(IndexStoreError, match="already exists"):
        TokenStore.create(tmp_path / "s")
    with pytest.raises(IndexStoreError, match="commit.json is missing"):
        TokenStore.open(tmp_path / "nothing-here")


def test_closed_store_refuses_reads(tmp_path: Path, rng: np.random.Generator) -> None:
    store = TokenStore.create(tmp_path / "s")
    store.append(lists(rng, [2]))
    store.close()
    store.close()
    with pytest.raises(IndexStoreError, match="closed"):
        store.get([0])


def _write_sparse_store(root: Path, counts: np.ndarray, real: dict[int, np.ndarray]) -> None:
    """A store whose tokens.bin is a sparse file of sum(counts) rows, real data only at `real`."""
    root.mkdir()
    ends = np.cumsum(counts, dtype=np.int64)
    with open(root / token_store.TOKENS, "wb") as f:
        f.truncate(int(ends[-1]) * 128 * 2)
        for i, rows in real.items():
            f.seek(int(ends[i] - counts[i]) * 128 * 2)
            f.write(rows.astype(np.float16).tobytes())
    (root / token_store.ENDS).write_bytes(ends.tobytes())
    seg = struct.pack("<qqIII4x", len(counts), int(ends[-1]), 0, 0, 0)
    (root / token_store.SEGMENTS).write_bytes(seg)
    record = token_store._record("fp16", 128, len(counts), int(ends[-1]), 1, zlib.crc32(seg))
    (root / token_store.COMMIT).write_text(json.dumps(record))


def test_get_reads_only_the_requested_rows(tmp_path: Path, rng: np.random.Generator) -> None:
    # 6,000 images x 3,500 tokens = 10.8 GB of fp16 rows: far more than this test may load.
    # Opening (verify="sizes") and reading three images must touch only those rows.
    counts = np.full(6000, 3500, dtype=np.int64)
    real = {0: unit_rows(rng, 3500), 3141: unit_rows(rng, 3500), 5999: unit_rows(rng, 3500)}
    _write_sparse_store(tmp_path / "big", counts, real)
    with TokenStore.open(tmp_path / "big", verify="sizes") as store:
        assert len(store) == 6000
        got = store.get([5999, 3141, 0, 17])
    for g, i in zip(got[:3], [5999, 3141, 0], strict=True):
        np.testing.assert_array_equal(g, real[i].astype(np.float16))
    np.testing.assert_array_equal(got[3], 0)  # an untouched (sparse) image reads as zeros


def test_torn_tail_is_ignored_then_truncated(tmp_path: Path, rng: np.random.Generator) -> None:
    first, second = lists(rng, [40, 3]), lists(rng, [11, 0, 5])
    path = tmp_path / "s"
    with TokenStore.create(path, dtype="int8") as store:
        store.append(first)
    # A crash mid-append: garbage past the committed end of every file, a half-written temp
    # commit record, and a data file cut in the middle of a row.
    for name in (token_store.TOKENS, token_store.SCALES, token_store.ENDS, token_store.SEGMENTS):
        with open(path / name, "ab") as f:
            f.write(os.urandom(1001))
    with open(path / token_store.TOKENS, "r+b") as f:
        f.truncate(43 * 128 + 77)
    (path / (token_store.COMMIT + ".tmp")).write_bytes(b'{"format": "fol-infer-tok')
    with TokenStore.open(path, verify="full") as store:
        assert len(store) == 2
        expected = store.get([0, 1])
        assert store.append(second) == range(2, 5)
    with TokenStore.open(path, verify="full") as store:
        np.testing.assert_array_equal(store.counts, [40, 3, 11, 0, 5])
        got = store.get(range(5))
        for g, e in zip(got[:2], expected, strict=True):
            np.testing.assert_array_equal(g, e)
        for g, want in zip(got[2:], second, strict=True):
            assert np.abs(g.astype(np.float32) - want).max(initial=0.0) < 0.01


def test_crash_before_commit_keeps_last_commit(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s"
    kept = lists(rng, [8])
    with TokenStore.create(path) as store:
        store.append(kept)

        def die(*args: object, **kwargs: object) -> None:
            raise KeyboardInterrupt  # stands for a kill between fsync and commit

        monkeypatch.setattr(token_store, "write_json_atomic", die)
        with pytest.raises(KeyboardInterrupt):
            store.append(lists(rng, [100, 200]))
    monkeypatch.undo()
    assert os.path.getsize(path / token_store.TOKENS) > 8 * 256  # the uncommitted rows are there
    with TokenStore.open(path, verify="full") as store:
        assert len(store) == 1
        np.testing.assert_array_equal(store.get([0])[0], kept[0].astype(np.float16))
        more = lists(rng, [6])
        store.append(more)
        np.testing.assert_array_equal(store.get([1])[0], more[0].astype(np.float16))
    assert len(TokenStore.open(path, verify="full")) == 2


def test_sizes_mismatch_detected_at_open(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "s"
    with TokenStore.create(path) as store:
        store.append(lists(rng, [20, 20]))
    with open(path / token_store.TOKENS, "r+b") as f:
        f.truncate(30 * 256 + 10)
    want = rf"tokens\.bin has {30 * 256 + 10} bytes but the commit record says {40 * 256}"
    with pytest.raises(IndexStoreError, match=want):
        TokenStore.open(path)


@pytest.mark.parametrize("dtype,name", [("fp16", "tokens.bin"), ("int8", "scales.bin")])
def test_checksum_corruption_found_by_full_verify(
    tmp_path: Path, rng: np.random.Generator, dtype: str, name: str
) -> None:
    path = tmp_path / "s"
    with TokenStore.create(path, dtype=dtype) as store:  # type: ignore[arg-type]
        store.append(lists(rng, [10]))
        store.append(lists(rng, [10, 4]))
    with open(path / name, "r+b") as f:  # flip one byte inside the second commit
        f.seek(os.path.getsize(path / name) - 3)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    TokenStore.open(path, verify="sizes").close()  # sizes alone cannot see it
    with pytest.raises(
        DamagedFileError, match=rf"{name} is damaged: its crc32 differs in commit 1"
    ):
        TokenStore.open(path, verify="full")


def test_segment_list_corruption_found_at_open(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "s"
    with TokenStore.create(path) as store:
        store.append(lists(rng, [3]))
    data = bytearray((path / token_store.SEGMENTS).read_bytes())
    data[0] ^= 1
    (path / token_store.SEGMENTS).write_bytes(bytes(data))
    with pytest.raises(DamagedFileError, match="segments.bin is damaged: it fails its checksum"):
        TokenStore.open(path)


def test_schema_version_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "s"
    TokenStore.create(path).close()
    record = json.loads((path / token_store.COMMIT).read_text())
    record["schema_version"] = token_store.SCHEMA_VERSION + 41
    (path / token_store.COMMIT).write_text(json.dumps(record))
    want = rf"schema version {token_store.SCHEMA_VERSION + 41}.*reads version "
    with pytest.raises(IndexStoreError, match=want + rf"{token_store.SCHEMA_VERSION}.*rebuild"):
        TokenStore.open(path)


def test_disk_full_leaves_last_commit(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s"
    kept = lists(rng, [12, 5])
    store = TokenStore.create(path, dtype="int8")
    store.append(kept)
    before = store.get([0, 1])
    real_write = token_store._write
    calls = []

    def full_disk(f: object, data: bytes) -> None:
        calls.append(1)
        if len(calls) == 2:  # the tokens went through, the scales hit a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(f, data)  # type: ignore[arg-type]

    monkeypatch.setattr(token_store, "_write", full_disk)
    with pytest.raises(IndexStoreError, match="disk full while appending"):
        store.append(lists(rng, [50]))
    assert len(store) == 2
    # A full disk when committing the record is the same to the caller.
    monkeypatch.setattr(token_store, "_write", real_write)
    monkeypatch.setattr(
        metadata.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
    )
    with pytest.raises(IndexStoreError, match="disk full while committing"):
        store.append(lists(rng, [50]))
    monkeypatch.undo()
    assert len(store) == 2
    for g, e in zip(store.get([0, 1]), before, strict=True):
        np.testing.assert_array_equal(g, e)
    after = lists(rng, [9])
    assert store.append(after) == range(2, 3)
    store.close()
    with TokenStore.open(path, verify="full") as reopened:
        np.testing.assert_array_equal(reopened.counts, [12, 5, 9])


def test_one_writer_at_a_time(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "s"
    with TokenStore.create(path) as a, TokenStore.open(path) as b:
        a.append(lists(rng, [1]))
        with pytest.raises(IndexStoreError, match="another writer"):
            b.append(lists(rng, [1]))
        assert len(b) == 0  # b still serves the commit it opened
    with TokenStore.open(path) as c:  # closing released the lock
        c.append(lists(rng, [2]))
        assert len(c) == 2


def test_a_stale_writer_catches_up_instead_of_cutting(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    path = tmp_path / "s"
    TokenStore.create(path).close()
    stale = TokenStore.open(path)
    with TokenStore.open(path) as other:
        other.append(lists(rng, [4, 4]))
    assert len(stale) == 0  # it still serves the commit it opened
    assert stale.append(lists(rng, [3])) == range(2, 3)
    stale.close()
    with TokenStore.open(path, verify="full") as store:
        np.testing.assert_array_equal(store.counts, [4, 4, 3])


def test_truncate_to_a_commit_boundary(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "s"
    first, second = lists(rng, [6, 2]), lists(rng, [5])
    with TokenStore.create(path, dtype="int8") as store:
        store.append(first)
        store.append(lists(rng, [9, 9, 9]))
        with pytest.raises(UsageError, match="commits end at 2 and 5"):
            store.truncate(3)
        with pytest.raises(UsageError, match="it holds 5"):
            store.truncate(6)
        kept = store.get([0, 1])
        store.truncate(2)
        assert len(store) == 2
    with TokenStore.open(path, verify="full") as store:
        assert len(store) == 2
        assert store.append(second) == range(2, 3)
        np.testing.assert_array_equal(store.counts, [6, 2, 5])
        for g, e in zip(store.get([0, 1]), kept, strict=True):
            np.testing.assert_array_equal(g, e)
        store.truncate(0)
        assert store.append(first) == range(0, 2)
    assert len(TokenStore.open(path, verify="full")) == 2


def test_reads_are_thread_safe_during_appends(tmp_path: Path, rng: np.random.Generator) -> None:
    batches = [lists(rng, [int(n) for n in rng.integers(0, 300, 8)]) for _ in range(6)]
    flat = [t.astype(np.float16) for b in batches for t in b]
    errors: list[BaseException] = []
    path = tmp_path / "s"
    with TokenStore.create(path) as store:
        store.append(batches[0])
        stop = threading.Event()

        def reader(seed: int) -> None:
            r = np.random.default_rng(seed)
            try:
                while not stop.is_set():
                    ids = r.integers(0, len(store), 5)
                    for i, g in zip(ids, store.get(ids), strict=True):
                        np.testing.assert_array_equal(g, flat[i])
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
        for t in threads:
            t.start()
        for b in batches[1:]:
            store.append(b)
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert len(TokenStore.open(path)) == len(flat)


_IMAGES = """
import numpy as np

POOL = np.random.default_rng(0).standard_normal((8000, 128)).astype(np.float32)


def image(i):
    # Cheap, so that the child spends its time writing: a slice of a fixed random pool.
    r = np.random.default_rng(i)
    n = int(r.integers(0, 3600))
    start = int(r.integers(0, len(POOL) - n))
    return POOL[start : start + n]
"""

_CHILD = (
    _IMAGES
    + """
import sys
from fol_infer.index.token_store import TokenStore

store = TokenStore.open(sys.argv[1])
while True:
    n = len(store)
    store.append([image(i) for i in range(n, n + 16)])
    print(len(store), flush=True)
"""
)

_namespace: dict = {}
exec(_IMAGES, _namespace)
_image = _namespace["image"]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
def test_kill_9_mid_append_then_resume(tmp_path: Path) -> None:
    path = tmp_path / "s"
    TokenStore.create(path).close()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for wait_commits, delay in ((2, 0.03), (3, 0.05), (2, 0.002)):
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(path)], stdout=subprocess.PIPE, env=env, text=True
        )
        assert proc.stdout is not None
        printed = [int(proc.stdout.readline()) for _ in range(wait_commits)]
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)  # most likely while it writes the next batch
        proc.wait()
        printed += [int(line) for line in proc.stdout.read().split()]  # any still in the pipe
        proc.stdout.close()
        with TokenStore.open(path, verify="full") as store:
            n = len(store)
            # Every printed commit survived; at most the batch being written when killed is
            # there too (killed after os.replace, before print), never a part of a batch.
            assert n % 16 == 0 and printed[-1] <= n <= printed[-1] + 16, (printed, n)
            ids = [0, n // 2, n - 1]
            for i, g in zip(ids, store.get(ids), strict=True):
                np.testing.assert_array_equal(g, _image(i).astype(np.float16))
    with TokenStore.open(path) as store:  # and appending resumes where it stopped
        n = len(store)
        assert store.append([_image(n)]) == range(n, n + 1)
    with TokenStore.open(path, verify="full") as store:
        np.testing.assert_array_equal(store.get([n])[0], _image(n).astype(np.float16))
