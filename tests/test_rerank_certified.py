"""The certified int8 re-ranker: float32 scores from int8 tokens plus the rows it must read.

Two kinds of data. Small integer tokens (as in test_rerank_cpu.py) make every product exact, so
ties and similarities equal to the threshold are real, and int8 (scale = max|x| / 127) cannot
represent the tokens exactly: every such decision must go to the float32 rows. Unit tokens
with similarities planted a hair either side of 0.7 are the realistic hard case, where plain
int8 scores are wrong and the certified ones must not be.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rerank_reference import reference_scores
from test_rerank_cpu import BLOCK_BYTES, THRESHOLDS, token_sets

from fol_infer.index.token_store import quantize_int8
from fol_infer.rerank import count_mutual_matches, count_mutual_matches_certified
from fol_infer.rerank.certified import Quantized


def certified(
    query: np.ndarray,
    cands: list[np.ndarray],
    thr: float = 0.7,
    block: int | None = None,
    workers: int | None = None,
) -> tuple[np.ndarray, int, list[tuple[int, np.ndarray]]]:
    """Scores, float32 rows read, and every (candidate, rows) request made."""
    quantized: list[Quantized] = [quantize_int8(c) for c in cands]
    requests: list[tuple[int, np.ndarray]] = []

    def originals(q: int, k: int, rows: np.ndarray) -> np.ndarray:
        assert q == 0
        requests.append((k, rows))
        return cands[k][rows]

    kwargs = {"block_bytes": block} if block else {}
    (out,) = count_mutual_matches_certified(
        [query], [quantized], originals, thr, workers=workers, **kwargs
    )
    assert out.rows == sum(len(c) for c in cands)
    return out.scores, out.exact_rows, requests


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def near_threshold_pairs(rng: np.random.Generator, n: int, offsets: np.ndarray) -> tuple:
    """Query and candidate of n unit tokens where pair (i, i) has similarity 0.7 + offsets[i]
    and every other similarity is far below (the other tokens are nearly orthogonal)."""
    dim = 128
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
    q = basis[:n]
    cos = 0.7 + offsets
    r = unit(cos[:, None] * q + np.sqrt(1 - cos**2)[:, None] * basis[n : 2 * n])
    return q, r


@settings(max_examples=80, deadline=None)
@given(token_sets(), THRESHOLDS, BLOCK_BYTES, st.sampled_from([1, 2]))
def test_certified_matches_reference_on_exact_ties(
    data: tuple, thr: float, block: int, workers: int
) -> None:
    query, cands = data
    scores, _, requests = certified(query, cands, thr, block, workers)
    np.testing.assert_array_equal(scores, reference_scores(query, cands, thr))
    for k, rows in requests:  # only sorted, unique, in-range rows are ever asked for
        assert np.all(np.diff(rows) > 0) and rows.min() >= 0 and rows.max() < len(cands[k])


def test_near_threshold_pairs_read_originals_and_match_float32() -> None:
    """Similarities within the int8 error of 0.7: plain int8 miscounts, certified does not."""
    rng = np.random.default_rng(0)
    offsets = rng.uniform(-3e-3, 3e-3, 40).astype(np.float32)
    offsets[np.abs(offsets) < 1e-5] = 1e-3  # keep clear of float32 rounding at 0.7 itself
    query, cand = near_threshold_pairs(rng, 40, offsets)
    want = count_mutual_matches(query, [cand], backend="cpu")
    assert want[0] == np.count_nonzero(offsets > 0)
    codes, scales = quantize_int8(cand)
    plain = count_mutual_matches(query, [codes * scales[:, None]], backend="cpu")
    assert plain[0] != want[0], "int8 alone should miscount here, or the test proves nothing"
    scores, exact_rows, _ = certified(query, [cand])
    np.testing.assert_array_equal(scores, want)
    assert 0 < exact_rows <= len(cand)


def test_clear_cases_read_no_originals() -> None:
    """Matches far above and non-matches far below the threshold need no float32 row."""
    rng = np.random.default_rng(1)
    offsets = np.where(np.arange(30) % 2 == 0, 0.2, -0.3).astype(np.float32)
    query, cand = near_threshold_pairs(rng, 30, offsets)
    scores, exact_rows, requests = certified(query, [cand, cand[:0], cand[::-1].copy()])
    np.testing.assert_array_equal(
        scores, count_mutual_matches(query, [cand, cand[:0], cand[::-1].copy()], backend="cpu")
    )
    assert scores[0] == 15 and exact_rows == 0 and requests == []


def test_model_like_tokens_match_the_cpu_backend() -> None:
    """Clusters of near-duplicate unit tokens, shared between query and candidates, as local
    features of one region are: argmax near-ties and near-threshold pairs everywhere."""
    rng = np.random.default_rng(2)
    centres = unit(rng.standard_normal((40, 128)))

    def image(n: int) -> np.ndarray:
        return unit(centres[rng.integers(0, 40, n)] + 0.5 * unit(rng.standard_normal((n, 128))))

    query = image(300)
    cands = [image(int(rng.integers(1, 300))) for _ in range(12)]
    want = count_mutual_matches(query, cands, backend="cpu")
    assert want.max() > 0
    scores, exact_rows, requests = certified(query, cands, block=64 << 10)
    np.testing.assert_array_equal(scores, want)
    assert 0 < exact_rows <= sum(len(c) for c in cands)
    for k in range(len(cands)):  # no row is asked for twice
        asked = np.concatenate([rows for c, rows in requests if c == k] or [np.zeros(0, int)])
        assert len(np.unique(asked)) == len(asked) <= len(cands[k])


def test_several_queries_share_one_call() -> None:
    rng = np.random.default_rng(3)
    queries = [unit(rng.standard_normal((n, 16))) for n in (5, 0, 9)]
    lists = [[unit(rng.standard_normal((n, 16))) for n in (4, 7)] for _ in queries]
    lists[2].append(queries[2][::2].copy())  # a planted match
    out = count_mutual_matches_certified(
        queries,
        [[quantize_int8(c) for c in cands] for cands in lists],
        lambda q, k, rows: lists[q][k][rows],
    )
    for q, cands, got in zip(queries, lists, out, strict=True):
        np.testing.assert_array_equal(got.scores, reference_scores(q, cands))
    assert out[2].scores[-1] == 5


@pytest.mark.parametrize(
    ("codes", "scales", "message"),
    [
        (np.zeros((3, 8), np.float32), np.ones(3, np.float32), "codes must be int8"),
        (
            np.zeros((3, 4), np.int8),
            np.ones(3, np.float32),
            r"codes must be int8 \(n, 8\), got int8",
        ),
        (np.zeros((3, 8), np.int8), np.ones(2, np.float32), "3 rows need as many"),
        (np.zeros((3, 8), np.int8), np.array([1, np.nan, 1], np.float32), "3 rows need as"),
    ],
)
def test_bad_candidates_raise_naming_them(
    codes: np.ndarray, scales: np.ndarray, message: str
) -> None:
    with pytest.raises(ValueError, match=f"candidate 0 of query 0: {message}"):
        count_mutual_matches_certified(
            [np.ones((2, 8), np.float32)], [[(codes, scales)]], lambda q, k, r: codes[r]
        )


def test_non_finite_query_raises() -> None:
    query = np.ones((2, 8), np.float32)
    query[1, 3] = np.nan
    with pytest.raises(ValueError, match="query 0 must be a finite"):
        count_mutual_matches_certified([query], [[]], lambda q, k, r: r)


@pytest.mark.parametrize("kind", ["planted matches", "look-alike tokens"])
def test_memory_stays_bounded_by_the_block(kind: str) -> None:
    """2,000 x 2,000 tokens: S alone would take 15 MiB; with 1 MiB blocks the whole call
    (de-quantised rows, bounds, float32 reads, the read-whole fallback) stays under 8 MiB."""
    rng = np.random.default_rng(4)
    query = unit(rng.standard_normal((2000, 128)))
    if kind == "planted matches":  # a few percent of rows read in float32
        cands = [unit(rng.standard_normal((2000, 128))) for _ in range(2)]
        for c in cands:
            c[:600] = unit(query[:600] + rng.uniform(0.3, 1.3, (600, 1)) * unit(c[:600]))
    else:  # too alike for int8: every candidate read whole
        centres = unit(rng.standard_normal((300, 128)))
        query = unit(centres[rng.integers(0, 300, 2000)] + 0.3 * query)
        cands = [
            unit(centres[rng.integers(0, 300, 2000)] + 0.3 * unit(rng.standard_normal((2000, 128))))
            for _ in range(2)
        ]
    want = count_mutual_matches(query, cands, backend="cpu")
    quantized = [quantize_int8(c) for c in cands]
    tracemalloc.start()
    try:
        (out,) = count_mutual_matches_certified(
            [query], [quantized], lambda q, k, rows: cands[k][rows], block_bytes=1 << 20, workers=1
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(out.scores, want)
    if kind == "planted matches":
        assert 0 < out.exact_rows < out.rows // 10
    else:
        assert out.exact_rows == out.rows
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB"
