"""The CPU re-ranker (and the published torch formulation) against the float64 reference.

Tokens are small integers in a few dimensions, so every product is exact in float16, float32
and float64 alike and exact ties are everywhere, in rows and in columns; tiny block sizes force
many tiles on both axes, which is where the lowest-index tie rule can break.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rerank_reference import reference_order, reference_score, reference_scores

import fol_infer.rerank.dispatch as rerank
from fol_infer.errors import BackendUnavailableError, UsageError
from fol_infer.rerank import cpu
from fol_infer.rerank.cpu import count_mutual_matches_many_cpu, threshold_f32, tile_shape

FAST = settings(max_examples=60, deadline=None)
THRESHOLDS = st.sampled_from([-1.0, 0.0, 0.7, 1.0, 2.5])
# Tile sizes in bytes (4 per similarity): from one similarity per tile, so that every row and
# column is split across tiles, to the default size, where every pair here fits in one tile.
BLOCK_BYTES = st.sampled_from([4, 8, 12, 24, 40, 96, cpu.DEFAULT_BLOCK_BYTES])


@st.composite
def token_sets(draw: st.DrawFn, max_n: int = 9, max_k: int = 4, dim: int | None = None) -> tuple:
    """(query, candidates): integer tokens in {-2..2}^D, some candidates reusing query tokens."""
    dim = dim or draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    nq = draw(st.integers(0, max_n))
    q = rng.integers(-2, 3, (nq, dim)).astype(np.float32)
    cands = []
    for _ in range(draw(st.integers(0, max_k))):
        nr = draw(st.integers(0, max_n))
        r = rng.integers(-2, 3, (nr, dim)).astype(np.float32)
        if nq and nr and draw(st.booleans()):  # duplicated query tokens: column and row ties
            half = nr // 2 + 1
            r[:half] = q[rng.integers(0, nq, half)]
        cands.append(r)
    return q, cands


@st.composite
def query_batches(draw: st.DrawFn) -> tuple[list, list]:
    """Several queries of one dimension; the last reuses the first one's first candidate."""
    dim = draw(st.integers(1, 4))
    batch = draw(st.lists(token_sets(max_n=6, max_k=3, dim=dim), max_size=5))
    queries = [q for q, _ in batch]
    lists = [list(c) for _, c in batch]
    if len(lists) > 1 and lists[0]:
        lists[-1].append(lists[0][0])
    return queries, lists


@FAST
@given(token_sets(), THRESHOLDS, BLOCK_BYTES, st.sampled_from([1, 2]))
def test_cpu_matches_reference(data: tuple, thr: float, block: int, workers: int) -> None:
    q, cands = data
    got = count_mutual_matches_many_cpu([q], [cands], thr, block_bytes=block, workers=workers)
    np.testing.assert_array_equal(got[0], reference_scores(q, cands, thr))
    assert got[0].dtype == np.int64


@FAST
@given(token_sets(), st.sampled_from([-1.0, 0.0, 0.7]))  # the API takes cosines: [-1, 1)
def test_public_api_cpu_float16_matches_reference(data: tuple, thr: float) -> None:
    q, cands = data
    want = reference_scores(q, cands, thr)
    for dtype in (np.float32, np.float16):
        got = rerank.count_mutual_matches(
            q.astype(dtype), [c.astype(dtype) for c in cands], thr, backend="cpu"
        )
        np.testing.assert_array_equal(got, want)


@settings(max_examples=25, deadline=None)
@given(query_batches(), BLOCK_BYTES)
def test_many_queries_at_once(batch: tuple, block: int) -> None:
    queries, lists = batch
    got = count_mutual_matches_many_cpu(queries, lists, 0.7, block_bytes=block, workers=2)
    assert len(got) == len(queries)
    for q, cands, g in zip(queries, lists, got, strict=True):
        np.testing.assert_array_equal(g, reference_scores(q, cands, 0.7))
    public = rerank.count_mutual_matches_many(queries, lists, 0.7, backend="cpu")
    for g, p in zip(got, public, strict=True):
        np.testing.assert_array_equal(g, p)


# Block sizes (bytes) that put every token in a tile of its own, then fewer, then one tile.
TILINGS = (4, 8, 12, 16, 4 << 20)


def test_column_ties_keep_the_first_row_across_tiles() -> None:
    # Candidate token 0 ties between query rows 0 and 3. Row 0 prefers token 1, row 3 prefers
    # token 0: only the first-row rule (i(0) = 0) keeps row 3 from counting. Score 1, not 2.
    q = np.array([[1, 1], [-1, -1], [-2, -2], [1, 0]], np.float32)
    r = np.array([[1, 0], [0, 2]], np.float32)
    assert reference_score(q, r) == 1
    for block in TILINGS:
        assert count_mutual_matches_many_cpu([q], [[r]], block_bytes=block)[0][0] == 1


def test_row_ties_keep_the_first_column_across_tiles() -> None:
    # Query row 0 ties between candidate tokens 0 and 2. Token 0 prefers row 1, token 2 prefers
    # row 0: only the first-column rule (j(0) = 0) keeps row 0 from counting. Score 1, not 2.
    q = np.array([[1, 1], [2, 0]], np.float32)
    r = np.array([[1, 0], [-1, -1], [0, 1]], np.float32)
    assert reference_score(q, r) == 1
    for block in TILINGS:
        assert count_mutual_matches_many_cpu([q], [[r]], block_bytes=block)[0][0] == 1


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_exactly_one_pair_scores_one(backend: str) -> None:
    """The published squeeze quirk scores this candidate 0; the spec says 1."""
    if backend == "torch":
        pytest.importorskip("torch", reason="the published formulation needs torch")
    q = np.array([[1, 0], [0, 1]], np.float32)
    r = np.array([[1, 0], [0, -1]], np.float32)
    assert rerank.count_mutual_matches(q, [r], backend=backend).tolist() == [1]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_degenerate_shapes(backend: str) -> None:
    if backend == "torch":
        pytest.importorskip("torch", reason="the published formulation needs torch")
    one = np.full((1, 128), 128**-0.5, np.float32)
    zeros = np.zeros((5, 128), np.float32)
    empty = np.zeros((0, 128), np.float32)
    score = rerank.count_mutual_matches
    assert score(one, [one], backend=backend).tolist() == [1]  # one token each
    assert score(one, [empty, one, empty], backend=backend).tolist() == [0, 1, 0]  # Nr = 0
    assert score(empty, [one, zeros], backend=backend).tolist() == [0, 0]  # Nq = 0
    assert score(one, [], backend=backend).shape == (0,)
    # zero vectors: S is all 0, every argmax ties to index 0, so only (0, 0) is mutual.
    assert score(zeros, [zeros], backend=backend).tolist() == [0]
    assert score(zeros, [zeros], threshold=-1.0, backend=backend).tolist() == [1]


def test_no_match_scores_zero() -> None:
    rng = np.random.default_rng(3)
    q = rng.standard_normal((40, 128)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    r = -q[::-1].copy()  # every similarity with a negated token is below the threshold
    got = rerank.count_mutual_matches(q, [r, r[:3]], backend="cpu")
    np.testing.assert_array_equal(got, reference_scores(q, [r, r[:3]]))
    assert got.tolist() == [0, 0]


@settings(max_examples=25, deadline=None)
@given(token_sets(max_n=7, max_k=3), THRESHOLDS)
def test_torch_published_matches_reference(data: tuple, thr: float) -> None:
    pytest.importorskip("torch", reason="the published formulation needs torch")
    from fol_infer.rerank.torch_published import count_mutual_matches_many_torch

    q, cands = data
    got = count_mutual_matches_many_torch([q], [cands], thr)
    np.testing.assert_array_equal(got[0], reference_scores(q, cands, thr))


@settings(max_examples=200, deadline=None)
@given(
    st.floats(-2, 2, width=32),
    st.floats(-2, 2, allow_nan=False) | st.sampled_from([0.7, float(np.float32(0.7))]),
)
def test_threshold_f32_comparison_is_exact(s: float, thr: float) -> None:
    assert bool(np.float32(s) > threshold_f32(thr)) == (s > thr)


def test_threshold_equal_to_a_similarity_does_not_pass() -> None:
    q = np.array([[np.float32(0.7)]], np.float32)  # S = float32(0.7) = 0.69999998...
    r = np.array([[1.0]], np.float32)
    assert rerank.count_mutual_matches(q, [r], 0.7, backend="cpu").tolist() == [0]
    assert rerank.count_mutual_matches(q, [r], 0.6999999, backend="cpu").tolist() == [1]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 50), st.integers(1, 50), st.integers(1, 100_000))
def test_tile_fits_the_block(nq: int, nr: int, block: int) -> None:
    tr, tq = tile_shape(nq, nr, block)
    assert 1 <= tr <= nr and 1 <= tq <= nq
    assert tr * tq * 4 <= max(block, 4)


def test_memory_stays_bounded_by_the_block() -> None:
    """S would be 3 x 9 MiB here; only one 256 KiB tile (plus O(N) statistics) may live."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1500, 16)).astype(np.float32)
    cands = [rng.standard_normal((1500, 16)).astype(np.float32) for _ in range(3)]
    tracemalloc.start()  # numpy reports its buffers to tracemalloc
    try:
        base = tracemalloc.get_traced_memory()[0]
        count_mutual_matches_many_cpu([q], [cands], block_bytes=256 << 10, workers=1)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"peak {peak} bytes"


def test_blas_threads_come_back_after_concurrent_calls() -> None:
    controls = cpu._openblas_threads()
    if controls is None:
        pytest.skip("numpy does not use its bundled OpenBLAS here: no thread count to hold")
    get, _ = controls
    before = get()
    rng = np.random.default_rng(1)
    q = rng.integers(-2, 3, (40, 4)).astype(np.float32)
    cands = [rng.integers(-2, 3, (30, 4)).astype(np.float32) for _ in range(4)]
    want = reference_scores(q, cands)

    def call(_: int) -> np.ndarray:
        return count_mutual_matches_many_cpu([q], [cands], block_bytes=256, workers=2)[0]

    with ThreadPoolExecutor(3) as pool:
        for got in pool.map(call, range(6)):
            np.testing.assert_array_equal(got, want)
    assert get() == before


@given(st.lists(st.integers(0, 4), max_size=30))
def test_rerank_order_is_stable_descending(scores: list) -> None:
    s = np.array(scores, np.int64)
    order = rerank.rerank_order(s)
    np.testing.assert_array_equal(order, reference_order(s))
    assert sorted(order.tolist()) == list(range(len(scores)))
    assert np.all(np.diff(s[order]) <= 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_raise_naming_the_input(dtype: type, bad: float) -> None:
    good: np.ndarray = np.ones((3, 8), dtype)
    broken = good.copy()
    broken[1, 2] = bad
    with pytest.raises(ValueError, match="query 0 contains NaN or Inf"):
        rerank.count_mutual_matches(broken, [good], backend="cpu")
    with pytest.raises(ValueError, match="candidate 1 of query 0 contains NaN or Inf"):
        rerank.count_mutual_matches(good, [good, broken], backend="cpu")


def test_misshaped_inputs_raise() -> None:
    q = np.ones((3, 8), np.float32)
    with pytest.raises(ValueError, match=r"candidate 0 of query 0 must be a \(N, 8\)"):
        rerank.count_mutual_matches(q, [np.ones((3, 4), np.float32)], backend="cpu")
    for dtype in (np.int32, np.float64):
        with pytest.raises(ValueError, match="float16 or float32"):
            rerank.count_mutual_matches(q.astype(dtype), [q], backend="cpu")
    with pytest.raises(ValueError, match="one list of candidates per query"):
        rerank.count_mutual_matches_many([q, q], [[q]], backend="cpu")


def test_unknown_backend_and_bad_threshold_are_usage_errors() -> None:
    q = np.ones((2, 8), np.float32)
    with pytest.raises(UsageError, match="unknown re-ranking backend 'gpu'"):
        rerank.count_mutual_matches(q, [q], backend="gpu")
    for bad in (float("nan"), float("inf"), 1.0, 1.5, -1.01):
        with pytest.raises(UsageError, match=r"threshold must be a finite number in \[-1, 1\)"):
            rerank.count_mutual_matches(q, [q], threshold=bad, backend="cpu")


@pytest.mark.parametrize(
    "reason, level, notice",
    [
        (
            rerank.NO_NVIDIA_GPU,
            logging.INFO,
            "re-ranking on the CPU (no NVIDIA GPU on this machine)",
        ),
        (
            "RuntimeError: no kernel image",
            logging.WARNING,
            "re-ranking on the CPU: this machine has an NVIDIA GPU but the triton kernel cannot "
            "run (RuntimeError: no kernel image)",
        ),
    ],
)
def test_auto_falls_back_to_cpu_with_one_notice(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    reason: str,
    level: int,
    notice: str,
) -> None:
    """Without a GPU the fallback is expected: one note. With a GPU that fails: one warning."""
    monkeypatch.setattr(rerank, "_triton_unavailable_reason", lambda: reason)
    monkeypatch.setattr(rerank, "_fallback_noted", False)
    q = np.array([[1, 0], [0, 1]], np.float32)
    with caplog.at_level(logging.DEBUG, logger=rerank.__name__):
        first = rerank.count_mutual_matches(q, [q, q[:1]])
        second = rerank.count_mutual_matches(q, [q])
    assert first.tolist() == [2, 1] and second.tolist() == [2]
    notices = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == rerank.__name__]
    assert notices == [(level, notice)]


def test_explicit_triton_without_gpu_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rerank, "_triton_unavailable_reason", lambda: "no NVIDIA GPU found")
    q = np.ones((2, 8), np.float32)
    with pytest.raises(BackendUnavailableError, match="pip install"):
        rerank.count_mutual_matches(q, [q], backend="triton")


def test_importing_the_package_imports_neither_torch_nor_triton() -> None:
    code = (
        "import sys, numpy as np, fol_infer.rerank as r;"
        "x = np.ones((2, 4), np.float32);"
        "r.count_mutual_matches(x, [x], backend='cpu');"
        "bad = [m for m in ('torch', 'triton') if m in sys.modules];"
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
