"""CPU re-ranker: mutual-nearest-neighbour counts in bounded memory, pure numpy.

Why this shape: the published code materialises S = Q R^T for all K candidates at once
(4.8 GiB per query at K = 100). Here S only ever exists as one tile of ``block_bytes`` per
worker, produced by a single sgemm and reduced while it is still in cache. Each (query,
candidate) pair keeps running (max, first argmax) statistics on both sides:

- query side, per query token i: the best candidate token j(i) over the tiles seen so far;
- candidate side, per candidate token j: the best query token i(j).

Tiles are visited in increasing index order on both axes and a running best is replaced only
by a strictly greater tile maximum, so ties go to the lowest index in both directions, as
the spec (section 7) requires.

The reductions, not the sgemm, are what a naive numpy port pays for, so each tile costs two
``max`` passes (SIMD, fast on both axes) and an ``argmax`` only on the lines whose tile
maximum beats both the running best and the threshold: a pair whose similarity is not above
the threshold can never count, so its argmax is never needed. The final count takes each
query token whose best similarity passes the threshold and checks i(j(i)) == i; its partner's
candidate-side argmax was computed, since that column's maximum is at least as large.

Workers: (query, candidate) pairs are shared among threads (numpy and BLAS release the GIL),
each with its own tile buffer, so the peak size of S alive is ``workers * block_bytes``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

DEFAULT_BLOCK_BYTES = 4 << 20  # one tile of S per worker; fits the last-level cache
MIN_TILE_ROWS = 8  # below this many candidate rows per tile, split the query side instead
_F32 = np.dtype(np.float32)


def threshold_f32(threshold: float) -> np.float32:
    """The largest float32 t <= threshold, so that ``s > t`` equals ``s > threshold`` exactly.

    numpy compares a float32 array with a Python float in float32; rounding 0.7 up would drop
    a similarity equal to float32(0.7) that the float64 comparison of the spec keeps... or the
    other way round. Rounding down once, here, makes every float32 comparison exact.
    """
    t = np.float32(threshold)
    if float(t) > threshold:
        t = np.nextafter(t, np.float32(-np.inf))
    return np.float32(t)


def tile_shape(nq: int, nr: int, block_bytes: int) -> tuple[int, int]:
    """(candidate rows, query columns) of one tile of S holding at most ``block_bytes``.

    The whole query width is preferred (each candidate token's column is then complete in one
    tile); the query side is split only when that would leave fewer than MIN_TILE_ROWS rows.
    Rows are balanced so that the last tile is not a sliver.
    """
    elems = max(1, block_bytes // _F32.itemsize)
    tq = nq if nq * MIN_TILE_ROWS <= elems else max(1, elems // MIN_TILE_ROWS)
    tr = max(1, min(nr, elems // tq))
    n_tiles = -(-nr // tr)
    return -(-nr // n_tiles), tq


def _update_lines(best: np.ndarray, arg: np.ndarray, s: np.ndarray, offset: int) -> None:
    """Merge the row maxima of tile ``s`` (rows are the lines) into a running best/argmax.

    A contiguous argmax costs no more than a max, so every line gets one: cheaper than a max
    pass followed by a second pass over the lines that pass the threshold.
    """
    tile_arg = s.argmax(axis=1)
    tile_max = s[np.arange(s.shape[0]), tile_arg]
    better = np.flatnonzero(tile_max > best)
    best[better] = tile_max[better]
    arg[better] = tile_arg[better] + offset


def _update_columns(
    best: np.ndarray, arg: np.ndarray, s: np.ndarray, offset: int, thr: np.float32
) -> None:
    """Merge the column maxima of tile ``s`` into a running best/argmax (strided side)."""
    tile_max = s.max(axis=0)
    need = np.flatnonzero(tile_max > np.maximum(best, thr))
    np.maximum(best, tile_max, out=best)
    if need.size:
        # Gathering the needed columns as rows beats numpy's argmax(axis=0), which copies the
        # whole tile transposed; past about a third of the columns the full pass wins.
        if 3 * need.size < s.shape[1]:
            arg[need] = s.T[need].argmax(axis=1) + offset
        else:
            arg[need] = s.argmax(axis=0)[need] + offset


def score_pair(
    q: np.ndarray,
    r: np.ndarray,
    thr: np.float32,
    buf: np.ndarray,
    block_bytes: int,
) -> int:
    """Number of mutual nearest-neighbour pairs above ``thr`` between float32 Q and R.

    ``buf`` is the worker's flat float32 scratch of at least ``block_bytes`` bytes.
    """
    nq, nr = q.shape[0], r.shape[0]
    if nq == 0 or nr == 0:
        return 0
    tr, tq = tile_shape(nq, nr, block_bytes)
    q_best = np.full(nq, -np.inf, np.float32)
    q_arg = np.zeros(nq, np.intp)
    r_best = np.full(nr, -np.inf, np.float32)
    r_arg = np.zeros(nr, np.intp)
    for q0 in range(0, nq, tq):
        q1 = min(nq, q0 + tq)
        q_t = q[q0:q1].T
        for r0 in range(0, nr, tr):
            r1 = min(nr, r0 + tr)
            s = buf[: (r1 - r0) * (q1 - q0)].reshape(r1 - r0, q1 - q0)
            np.matmul(r[r0:r1], q_t, out=s)
            _update_lines(r_best[r0:r1], r_arg[r0:r1], s, q0)
            _update_columns(q_best[q0:q1], q_arg[q0:q1], s, r0, thr)
    rows = np.flatnonzero(q_best > thr)
    return int(np.count_nonzero(r_arg[q_arg[rows]] == rows))


def default_workers() -> int:
    """One worker per available core: numpy's reductions are single-threaded."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _as_f32(a: np.ndarray) -> np.ndarray:
    """float32, C-contiguous: fp16 tokens are up-cast before any product (spec section 7)."""
    return np.ascontiguousarray(a, dtype=np.float32)


def count_mutual_matches_many_cpu(
    queries: Sequence[np.ndarray],
    candidate_lists: Sequence[Sequence[np.ndarray]],
    threshold: float = 0.7,
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    workers: int | None = None,
) -> list[np.ndarray]:
    """Scores (int64, one array per query) for validated (N, D) token arrays.

    All (query, candidate) pairs of all queries form one pool of work, so a batch of queries
    keeps every core busy; a float16 candidate is up-cast by the worker that scores it, so
    float32 copies are never held for more than one candidate per worker.
    """
    if block_bytes < _F32.itemsize:
        raise ValueError(f"block_bytes must hold one float32, got {block_bytes}")
    thr = threshold_f32(threshold)
    qs = [_as_f32(q) for q in queries]
    pairs = [
        (qi, ki, c)
        for qi, cands in enumerate(candidate_lists)
        for ki, c in enumerate(cands)
        if qs[qi].shape[0] and c.shape[0]
    ]
    scores = [np.zeros(len(c), np.int64) for c in candidate_lists]
    n_workers = min(workers or default_workers(), max(1, len(pairs)))
    todo = iter(pairs)
    lock = threading.Lock()

    def work() -> None:
        buf = np.empty(max(1, block_bytes // _F32.itemsize), np.float32)
        while True:
            with lock:
                item = next(todo, None)
            if item is None:
                return
            qi, ki, r = item
            scores[qi][ki] = score_pair(qs[qi], _as_f32(r), thr, buf, block_bytes)

    if n_workers == 1:
        work()
    else:
        with ThreadPoolExecutor(n_workers) as pool:
            for f in [pool.submit(work) for _ in range(n_workers)]:
                f.result()
    return scores
