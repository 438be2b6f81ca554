"""Exact re-ranking from int8 tokens: score the int8 copy, prove each decision with an error
bound, and read full-precision rows only where the bound cannot decide.

Why: a score is a chain of hard decisions (two argmaxes and a threshold per query token), and
any lossy copy of the database tokens flips some of them. On the synthetic benchmark
(benchmarks/token_store.py) plain int8 changes the re-ranked order of 97.5% of the queries,
fp16 of 16.5%. Here the int8 copy (0.24x the published bytes) is what every query reads in
full; the float32 originals stay on disk and only the rows behind undecided decisions are
read, so the counts are those of float32 tokens.

The bound. An int8 row is r^_j = scale_j * c_j with |r_jd - r^_jd| <= scale_j / 2, so
|q_i . r_j - q_i . r^_j| <= b_ij = scale_j / 2 * ||q_i||_1 (+ float32 rounding slack). With
S^ = Q R^^T, per candidate:

- query token i can count only if max_j S^_ij + max_j b_ij > t: the "hot" rows;
- j(i) is settled when one j beats every other even after both bounds; otherwise the
  contenders {j : S^_ij + b_ij >= max_j' (S^_ij' - b_ij')} are scored in float32, unless no
  contender could pair with i (for each, S_ij is bounded below another query row's S_i'j, or
  not above t): such a row cannot count and is dropped unread;
- i(j(i)) and the threshold are settled by the same rule on column j(i); otherwise that
  column is scored in float32 (one original row, Nq dot products).

When the undecided rows would need more than half of a candidate's rows (tokens too alike for
int8 to tell apart, as an untrained model's are), the candidate is read whole and scored by
the float32 CPU re-ranker instead; a small first block of query rows detects this early.

Memory per worker stays bounded: S^ exists one block of query rows at a time, as in the CPU
re-ranker; columns are scored in blocks of the same size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from fol_infer.rerank.cpu import (  # the CPU re-ranker's thread pool and kernel
    run_pairs,
    score_pair,
    threshold_f32,
)
from fol_infer.rerank.settings import DEFAULT_BLOCK_BYTES, DEFAULT_THRESHOLD

Quantized = tuple[np.ndarray, np.ndarray]  # int8 codes (n, D), float32 scale per row (n,)
ExactRows = Callable[[int, int, np.ndarray], np.ndarray]  # (query, candidate, rows) -> (m, D)

_HALF_STEP = 0.5 * (1 + 2.0**-20)  # |x - scale * round(x / scale)| <= this * scale, float32 incl.
_GAMMA = 2.0**-22  # float32 rounding of a D-term dot product: <= D * _GAMMA * sum |q_d r_d|
_MOST_ROWS = 0.5  # share of a candidate's rows read one by one before reading them all
_BOUND_ROUNDING = 2.0**-20  # float32 arithmetic on the bounds, relative to |S| and t


@dataclass(frozen=True)
class CertifiedScores:
    """Scores of one query's candidates and how many float32 rows they needed."""

    scores: np.ndarray  # int64 (K,)
    exact_rows: int  # original rows read from the full-precision store, all candidates
    rows: int  # rows of all candidates: exact_rows / rows is the share read in float32


def count_mutual_matches_certified(
    queries: Sequence[np.ndarray],
    candidate_lists: Sequence[Sequence[Quantized]],
    exact_rows: ExactRows,
    threshold: float = DEFAULT_THRESHOLD,
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    workers: int | None = None,
) -> list[CertifiedScores]:
    """Scores equal to those of the float32 tokens, from int8 candidates plus a few originals.

    ``queries`` are (Nq, D) float arrays; each candidate is (codes, scales) as the int8 token
    store keeps them. ``exact_rows(q, k, rows)`` returns the float32 originals of the sorted
    ``rows`` of candidate ``k`` of query ``q``; it is called only for undecided rows and may
    be called from several threads.
    """
    thr = threshold_f32(threshold)
    qs = [np.ascontiguousarray(q, np.float32) for q in queries]
    for qi, (q, cands) in enumerate(zip(qs, candidate_lists, strict=True)):
        if q.ndim != 2 or not np.isfinite(q).all():
            raise ValueError(f"query {qi} must be a finite (N, D) token array, got {q.shape}")
        for ki, (codes, scales) in enumerate(cands):
            if codes.dtype != np.int8 or codes.ndim != 2 or codes.shape[1] != q.shape[1]:
                raise ValueError(
                    f"candidate {ki} of query {qi}: codes must be int8 (n, {q.shape[1]}), got "
                    f"{codes.dtype} {codes.shape}"
                )
            good = scales.shape == (codes.shape[0],) and np.all(np.isfinite(scales) & (scales >= 0))
            if not good:
                raise ValueError(
                    f"candidate {ki} of query {qi}: {codes.shape[0]} rows need as many finite, "
                    f"non-negative scales, got {scales.shape}"
                )
    l1s = [np.abs(q).sum(axis=1, dtype=np.float32) for q in qs]
    pairs = [(qi, ki) for qi, c in enumerate(candidate_lists) for ki in range(len(c))]
    scores = [np.zeros(len(c), np.int64) for c in candidate_lists]
    exact = [np.zeros(len(c), np.int64) for c in candidate_lists]

    def score(item: tuple[int, int]) -> None:
        qi, ki = item
        codes, scales = candidate_lists[qi][ki]
        scores[qi][ki], exact[qi][ki] = _certified_pair(
            qs[qi], l1s[qi], codes, scales, partial(exact_rows, qi, ki), thr, block_bytes
        )

    run_pairs(pairs, lambda: score, workers)
    return [
        CertifiedScores(s, int(e.sum()), sum(len(c[0]) for c in cands))
        for s, e, cands in zip(scores, exact, candidate_lists, strict=True)
    ]


def _certified_pair(
    q: np.ndarray,
    q_l1: np.ndarray,
    codes: np.ndarray,
    scales: np.ndarray,
    exact: Callable[[np.ndarray], np.ndarray],
    thr: np.float32,
    block_bytes: int,
) -> tuple[int, int]:
    """(score, float32 rows read) of one query against one int8 candidate."""
    nq, nr = q.shape[0], codes.shape[0]
    if nq == 0 or nr == 0:
        return 0, 0
    r_hat = np.multiply(codes, scales[:, None], dtype=np.float32)
    half = (scales * np.float32(_HALF_STEP)).astype(np.float32)  # per-component error bound
    # rounding of S^ as computed here and of S as the float32 reference computes it, plus
    # the float32 arithmetic of the bounds themselves
    r_max = float(np.abs(r_hat).max() + half.max())
    magnitude = q_l1.astype(np.float64) * r_max + abs(float(thr))  # |S| and t are below this
    slack = ((2 * q.shape[1] * _GAMMA + _BOUND_ROUNDING) * magnitude).astype(np.float32)
    b = _Bounds(q_l1, half, slack)
    originals = _Originals(exact, nr)

    def whole() -> tuple[int, int]:
        """Read the candidate whole and score it as the float32 CPU re-ranker does."""
        buf = np.empty(max(1, block_bytes // 4), np.float32)
        return score_pair(np.ascontiguousarray(q.T), originals.all(), thr, buf, block_bytes), nr

    found = _rows(q, r_hat, b, thr, block_bytes)
    if found is None:
        return whole()
    i_hot, j_of, contenders = found
    if contenders:  # rows none of whose contenders could count are dropped unread
        alive = _could_count(q, r_hat, b, thr, i_hot, contenders, block_bytes)
        keep = np.ones(len(i_hot), bool)
        keep[[h for (h, _), a in zip(contenders, alive, strict=True) if not a]] = False
        position = np.cumsum(keep) - 1  # of each kept hot row, once the others are gone
        contenders = [
            (int(position[h]), c) for (h, c), a in zip(contenders, alive, strict=True) if a
        ]
        i_hot, j_of = i_hot[keep], j_of[keep]
    if i_hot.size == 0:
        return 0, 0
    if contenders:  # j(i) among the contenders, in float32 (lowest index on ties)
        cols = np.unique(np.concatenate([c for _, c in contenders]))
        if originals.too_many(cols):
            return whole()
        r_ex = originals.rows(cols)
        per_block = max(1, block_bytes // (4 * len(cols)))
        for c0 in range(0, len(contenders), per_block):
            chunk = contenders[c0 : c0 + per_block]
            s_ex = q[[i_hot[h] for h, _ in chunk]] @ r_ex.T
            for n, (h, c) in enumerate(chunk):
                j_of[h] = c[int(np.argmax(s_ex[n, np.searchsorted(cols, c)]))]
    counted, pending = _columns(q, r_hat, b, thr, i_hot, j_of, block_bytes)
    if pending.size:  # column j(i) in float32: its best query token and the similarity
        cols = np.unique(j_of[pending])
        if originals.too_many(cols):
            return whole()
        r_ex = originals.rows(cols)
        col_of, row_of = np.searchsorted(cols, j_of[pending]), i_hot[pending]
        per_block = max(1, block_bytes // (4 * nq))
        for c0 in range(0, len(cols), per_block):
            s_ex = r_ex[c0 : c0 + per_block] @ q.T  # columns of S, float32 like the reference
            mine = (col_of >= c0) & (col_of < c0 + per_block)
            n, i = col_of[mine] - c0, row_of[mine]
            counted += int(np.count_nonzero((s_ex.argmax(axis=1)[n] == i) & (s_ex[n, i] > thr)))
    return counted, originals.read


class _Originals:
    """A candidate's float32 rows, each read at most once; past ``_MOST_ROWS`` of them, the
    whole candidate is read in one go and scored in float32 instead."""

    def __init__(self, exact: Callable[[np.ndarray], np.ndarray], n: int):
        self.exact, self.n = exact, n
        self.cache: dict[int, np.ndarray] = {}

    @property
    def read(self) -> int:
        return len(self.cache)

    def too_many(self, cols: np.ndarray) -> bool:
        new = sum(1 for j in cols.tolist() if j not in self.cache)
        return self.read + new > _MOST_ROWS * self.n

    def rows(self, cols: np.ndarray) -> np.ndarray:
        missing = np.array([j for j in cols.tolist() if j not in self.cache], np.intp)
        if missing.size:
            self.cache.update(zip(missing.tolist(), self.exact(missing)))
        return np.stack([self.cache[j] for j in cols.tolist()]).astype(np.float32, copy=False)

    def all(self) -> np.ndarray:
        if not self.cache:
            self.cache.update(enumerate(self.exact(np.arange(self.n))))
        return np.ascontiguousarray(self.rows(np.arange(self.n)))


@dataclass(frozen=True)
class _Bounds:
    """|S_ij - S^_ij| <= l1[i] * half[j] + slack[i], all float32."""

    l1: np.ndarray  # ||q_i||_1
    half: np.ndarray  # scale_j / 2, rounded up
    slack: np.ndarray  # float32 rounding, per query row

    def of(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        return self.l1[i] * self.half[j] + self.slack[i]


def _top_two(s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of ``s``: argmax (first), maximum and the largest other value. Clobbers s."""
    arg = s.argmax(axis=1)
    lines = np.arange(len(s))
    top = s[lines, arg].copy()
    s[lines, arg] = -np.inf
    return arg, top, s.max(axis=1, initial=-np.inf)


def _rows(
    q: np.ndarray,
    r_hat: np.ndarray,
    b: _Bounds,
    thr: np.float32,
    block_bytes: int,
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, np.ndarray]]] | None:
    """Hot query rows (those that may pass the threshold); j(i) for each, where the bound
    settles it; and for the others, the columns that may hold the row's true maximum.

    S^ is formed one block of query rows at a time. A row whose two best values are further
    apart than twice its largest bound is settled at once; the others get the per-column test.
    None as soon as the candidate rows that undecided rows contend for, projected over the
    whole query, pass ``_MOST_ROWS`` of them: the candidate is then cheaper to score in float32
    than to finish here (tokens too alike for int8 to tell apart).
    """
    nr = r_hat.shape[0]
    rows_per_block = max(1, block_bytes // (4 * nr))
    h_max = b.half.max()
    hot_all: list[np.ndarray] = []
    j_all: list[np.ndarray] = []
    contenders: list[tuple[int, np.ndarray]] = []
    n_hot = 0  # hot rows found in earlier blocks
    wanted = np.zeros(nr, bool)  # candidate rows some undecided row contends for
    first = max(1, rows_per_block // 8)  # a small first block probes the candidate
    edges = [0, *range(first, q.shape[0], rows_per_block), q.shape[0]]
    for start, end in zip(edges[:-1], edges[1:], strict=True):
        s = q[start:end] @ r_hat.T
        rows = np.arange(start, end)
        reach = b.l1[rows] * h_max + b.slack[rows]
        hot = np.flatnonzero(s.max(axis=1) + reach > thr)
        if hot.size == 0:
            continue
        sh = s[hot]
        arg, top, second = _top_two(sh)
        j = np.where(top - second > 2 * reach[hot], arg, -1)
        unsettled = np.flatnonzero(j < 0)
        if unsettled.size:  # the per-column bound, for these rows only
            sub = sh[unsettled]
            sub[np.arange(len(unsettled)), arg[unsettled]] = top[unsettled]
            i = start + hot[unsettled]
            bound = b.l1[i, None] * b.half[None, :] + b.slack[i, None]
            floor = (sub - bound).max(axis=1)
            cont = sub + bound >= floor[:, None]
            one = np.count_nonzero(cont, axis=1) == 1
            j[unsettled[one]] = cont[one].argmax(axis=1)
            contenders += [
                (n_hot + int(h), np.flatnonzero(c))
                for h, c in zip(unsettled[~one], cont[~one], strict=True)
            ]
            wanted |= cont[~one].any(axis=0)
        hot_all.append(hot + start)
        j_all.append(j)
        n_hot += len(hot)
        if np.count_nonzero(wanted) * q.shape[0] > _MOST_ROWS * nr * end:
            return None
    if not hot_all:
        return np.zeros(0, np.intp), np.zeros(0, np.intp), []
    return np.concatenate(hot_all), np.concatenate(j_all).astype(np.intp), contenders


def _could_count(
    q: np.ndarray,
    r_hat: np.ndarray,
    b: _Bounds,
    thr: np.float32,
    i_hot: np.ndarray,
    contenders: list[tuple[int, np.ndarray]],
    block_bytes: int,
) -> np.ndarray:
    """Per undecided row: may one of its contenders j still pair with it? Not if, for every
    j, S_ij is bounded below another query row's S_i'j (i is not j's best) or not above t."""
    rows = np.concatenate([np.full(len(c), i_hot[h]) for h, c in contenders])
    cols = np.concatenate([c for _, c in contenders])
    owner = np.repeat(np.arange(len(contenders)), [len(c) for _, c in contenders])
    viable = np.zeros(len(cols), bool)
    unique = np.unique(cols)
    per_block = max(1, block_bytes // (4 * q.shape[0]))
    for c0 in range(0, len(unique), per_block):
        js = unique[c0 : c0 + per_block]
        sc = r_hat[js] @ q.T  # (len(js), nq): columns j of S^
        bound = b.half[js, None] * b.l1[None, :] + b.slack[None, :]
        floor = (sc - bound).max(axis=1)  # column j's best similarity is at least this
        mine = np.flatnonzero((cols >= js[0]) & (cols <= js[-1]))
        n = np.searchsorted(js, cols[mine])
        reach = sc[n, rows[mine]] + bound[n, rows[mine]]
        viable[mine] = (reach >= floor[n]) & (reach > thr)
    return np.bincount(owner[viable], minlength=len(contenders)) > 0


def _columns(
    q: np.ndarray,
    r_hat: np.ndarray,
    b: _Bounds,
    thr: np.float32,
    i_hot: np.ndarray,
    j_of: np.ndarray,
    block_bytes: int,
) -> tuple[int, np.ndarray]:
    """Pairs (i, j(i)) the bound proves counted, and the hot rows it cannot settle: those whose
    column's best query token, or whose similarity's side of the threshold, is in doubt."""
    cols = np.unique(j_of)
    per_block = max(1, block_bytes // (4 * q.shape[0]))
    l1_max, slack_max = b.l1.max(), b.slack.max()
    counted, pending = 0, []
    for c0 in range(0, len(cols), per_block):
        js = cols[c0 : c0 + per_block]
        arg, top, second = _top_two(r_hat[js] @ q.T)  # rows: columns j of S^
        settled = top - second > 2 * (b.half[js] * l1_max + slack_max)
        members = np.flatnonzero((j_of >= js[0]) & (j_of <= js[-1]))
        n = np.searchsorted(js, j_of[members])
        i = i_hot[members]
        mutual = settled[n] & (arg[n] == i)
        bound = b.of(i, j_of[members])
        counted += int(np.count_nonzero(mutual & (top[n] - bound > thr)))
        doubt = ~settled[n] | (mutual & (top[n] - bound <= thr) & (top[n] + bound > thr))
        pending.append(members[doubt])
    return counted, np.concatenate(pending)
