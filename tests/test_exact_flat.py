"""Flat search on the CPU (`index.exact_flat`): FAISS's query-by-query scores at any batch size.

The reference is FAISS's own query-by-query scan over every vector (an ID selector forces it
at any batch size), ranked by score descending, then the larger id first. Data: unit vectors,
exact duplicates (ties), and copies nudged by one float32 step in one coordinate (near-ties,
where BLAS rounding and FAISS's kernel disagree on the order).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fol_infer.index.global_index import GlobalIndex
from fol_infer.index.shards import merge_top_k


def database(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Unit vectors of which about a third are exact copies and a third near-copies."""
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    source = rng.integers(0, max(1, n // 3), n)
    kind = rng.integers(0, 3, n)
    x[kind == 1] = x[source[kind == 1]]
    nudged = np.flatnonzero(kind == 2)
    x[nudged] = x[source[nudged]]
    col = rng.integers(0, d, len(nudged))
    x[nudged, col] = np.nextafter(x[nudged, col], np.float32(np.inf))
    return x


def queries(rng: np.random.Generator, db: np.ndarray, nq: int) -> np.ndarray:
    """Half database vectors themselves (their copies tie), half database vectors plus noise."""
    q = db[rng.integers(0, len(db), nq)].copy()
    q[nq // 2 :] += 0.05 * rng.standard_normal(q[nq // 2 :].shape).astype(np.float32)
    return q


def reference(db: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """FAISS's query-by-query scores of every vector, ranked score descending, larger id first."""
    import faiss

    raw = faiss.IndexFlatIP(db.shape[1])
    raw.add(db)
    every = faiss.SearchParameters(sel=faiss.IDSelectorAll())
    scores, ids = raw.search(q, len(db), params=every)
    order = np.lexsort((-ids, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def flat(db: np.ndarray) -> GlobalIndex:
    index = GlobalIndex.create(db.shape[1], "Flat", device="cpu")
    index.add(db)
    return index


def assert_same(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> None:
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0].view(np.uint32), want[0].view(np.uint32))  # bit for bit


@pytest.mark.slow
def test_every_batch_size_and_every_k() -> None:
    rng = np.random.default_rng(0)
    db = database(rng, 240, 96)
    q = queries(rng, db, 300)
    index = flat(db)
    blas = q @ db.T
    want_all = reference(db, q, len(db))
    full = np.take_along_axis(blas, want_all[1], 1)
    assert (full != want_all[0]).any(), "BLAS and FAISS's kernel agree: the data tests nothing"
    for nq in range(1, 301):  # the reference scores query by query: its rows are any batch's
        k = 1 + (nq * 37) % 50  # every k: below
        assert_same(index.search(q[:nq], k), (want_all[0][:nq, :k], want_all[1][:nq, :k]))
    for k in range(1, len(db) + 1):
        assert_same(index.search(q[:20], k), (want_all[0][:20, :k], want_all[1][:20, :k]))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 300),
    d=st.sampled_from([1, 3, 8, 33, 256]),
    nq=st.integers(1, 40),
    k_share=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_equals_faiss_query_by_query(n: int, d: int, nq: int, k_share: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    db = database(rng, n, d)
    q = queries(rng, db, nq)
    k = max(1, round(k_share * n))
    assert_same(flat(db).search(q, k), reference(db, q, k))


def test_equals_faiss_in_groups_without_ties() -> None:
    """Without equal scores, the answer is what FAISS gives in groups of 8 queries (its
    query-by-query path below 10,000 vectors), bit for bit."""
    rng = np.random.default_rng(1)
    db = rng.standard_normal((3000, 200)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = queries(rng, db, 64)
    import faiss

    index, raw = flat(db), faiss.IndexFlatIP(db.shape[1])
    raw.add(db)
    for k in (1, 10, 100, 3000):
        parts = [raw.search(q[a : a + 8], k) for a in range(0, len(q), 8)]
        grouped = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        assert_same(index.search(q, k), grouped)


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_shards_merge_to_the_single_index_with_ties(k: int) -> None:
    """Equal scores across the k-th place: FAISS's heap keeps [3, 1] for k = 2 over the scores
    [1, 1, 1, 2], which no merge of shard lists gives; the total order merges exactly."""
    rng = np.random.default_rng(2)
    tiny = np.zeros((4, 4), np.float32)
    tiny[:, 0] = [1, 1, 1, 2]
    for db in (tiny, database(rng, 90, 5).round(1)):
        q = np.concatenate([db[:3], queries(rng, db, 5)])
        for cuts in ([2], [1, 3], [30, 31, 60]):
            bounds = [0, *[c for c in cuts if c < len(db)], len(db)]
            parts = []
            for a, b in zip(bounds, bounds[1:]):
                scores, ids = flat(db[a:b]).search(q, min(k, b - a))
                parts.append((scores, ids + a))
            merged = merge_top_k(parts, min(k, len(db)), len(q))
            assert_same(merged, flat(db).search(q, min(k, len(db))))


def test_one_query_alone_as_in_a_batch_on_10000_vectors() -> None:
    """FAISS searches fewer queries than threads over 10,000+ vectors with BLAS: not here."""
    rng = np.random.default_rng(3)
    db = rng.standard_normal((10_000, 24)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = queries(rng, db, 6)
    index = flat(db)
    batch = index.search(q, 10)
    for i in range(len(q)):
        assert_same(index.search(q[i : i + 1], 10), (batch[0][i : i + 1], batch[1][i : i + 1]))
    assert_same(batch, reference(db, q, 10))


def test_vectors_added_after_a_search_and_zero_queries() -> None:
    """The norm bound follows `add` (here: vectors 1000x longer); a zero query ties everything."""
    rng = np.random.default_rng(4)
    db = database(rng, 200, 16)
    index = flat(db[:100])
    q = queries(rng, db, 10)
    index.search(q, 5)
    index.add(db[100:] * 1000)
    whole = np.concatenate([db[:100], db[100:] * 1000])
    assert_same(index.search(q, 150), reference(whole, q, 150))
    _, ids = index.search(np.zeros((2, 16), np.float32), 7)
    np.testing.assert_array_equal(ids, [np.arange(199, 192, -1)] * 2)


def test_scores_that_overflow_float32() -> None:
    """|q| |x| past float32's range: no bound holds, every vector is scored (inf ties)."""
    rng = np.random.default_rng(5)
    db = database(rng, 60, 8) * np.float32(2e19)
    q = db[:4] + queries(rng, db, 4)
    with np.errstate(over="ignore"):
        assert np.isinf(q @ db.T).any()
    assert_same(flat(db).search(q, 9), reference(db, q, 9))


def test_a_batch_below_the_thread_count_as_on_a_16_core_machine() -> None:
    """With 16 threads, FAISS 1.15 takes BLAS for a group of 8 queries over 16,384+ vectors
    (the plain FAISS scores of this case differ from its kernel's): here they stay the kernel's."""
    import faiss

    rng = np.random.default_rng(6)
    db = rng.standard_normal((17_000, 16)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = queries(rng, db, 8)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(16)
    try:
        got = flat(db).search(q, 5)
    finally:
        faiss.omp_set_num_threads(threads)
    assert_same(got, reference(db, q, 5))
