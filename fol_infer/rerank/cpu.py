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

The reductions, not the sgemm, are what a naive numpy port pays for, so each tile gets one
full pass and little else. Rows of a tile are candidate tokens: contiguous, where numpy's
argmax costs no more than a max, so every row gets its argmax. Columns (query tokens) are
strided, where numpy's argmax copies the tile transposed, so they get less: a similarity
above the threshold lies in a row whose maximum is above it, so column maxima are taken over
those "hot" rows only (usually none for a candidate of another place), and an argmax only for
the columns that beat both their running best and the threshold. Below the threshold the
column statistics may be low, which never changes a count: the final count takes each query
token whose best similarity passes the threshold and checks i(j(i)) == i.

Workers: (query, candidate) pairs are shared among threads (numpy and BLAS release the GIL),
each with its own tile buffer; numpy's OpenBLAS is held to one thread meanwhile (see
``default_workers``). Memory for S is therefore bounded by the workers and ``block_bytes``
alone, whatever K and the token counts: per worker, the tile plus at most half a tile of
gathered hot rows and one tile of gathered columns (the latter only when nearly every
similarity passes the threshold).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TypeVar

import numpy as np

from fol_infer.rerank.settings import DEFAULT_BLOCK_BYTES, DEFAULT_THRESHOLD, RerankSettings

MIN_TILE_ROWS = 8  # below this many candidate rows per tile, split the query side instead
_F32 = np.dtype(np.float32)
T = TypeVar("T")


def threshold_f32(threshold: float) -> np.float32:
    """The largest float32 t <= threshold: for float32 s, ``s > t`` iff ``s > threshold``.

    numpy (and torch) compare a float32 array with a Python float in float32, after rounding
    the threshold to the nearest float32. Where that rounds up, a similarity equal to the
    rounded value is above the threshold yet fails the comparison; the float32 at or below
    the threshold has no such case. (0.7 itself rounds down, so its results are unchanged.)
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


def _update_lines(best: np.ndarray, arg: np.ndarray, s: np.ndarray, offset: int) -> np.ndarray:
    """Merge the row maxima of tile ``s`` into a running best/argmax; return the tile maxima.

    Rows are contiguous, and there numpy's argmax costs no more than a max, so every row
    gets one in a single pass.
    """
    tile_arg = s.argmax(axis=1)
    tile_max = s[np.arange(s.shape[0]), tile_arg]
    better = np.flatnonzero(tile_max > best)
    best[better] = tile_max[better]
    arg[better] = tile_arg[better] + offset
    return tile_max


def _update_columns(
    best: np.ndarray,
    arg: np.ndarray,
    s: np.ndarray,
    row_max: np.ndarray,
    offset: int,
    thr: np.float32,
) -> None:
    """Merge the column maxima of tile ``s`` into a running best/argmax, exact above ``thr``.

    Columns are strided, so they get less: only rows whose maximum passes the threshold
    (``row_max``) can hold a column maximum that passes it, so the column maxima are taken
    over those rows alone; below the threshold ``best`` may be low, which never changes a
    count. Then an argmax only where a column beats both its running best and the threshold,
    gathered as contiguous rows (numpy's own argmax(axis=0) copies the whole tile transposed).
    """
    hot = np.flatnonzero(row_max > thr)
    if hot.size == 0:
        return
    if 2 * hot.size > s.shape[0]:  # copying most of the tile would cost more than it saves
        hot, sub = np.arange(s.shape[0]), s
    else:
        sub = s[hot]
    tile_max = sub.max(axis=0)
    need = np.flatnonzero(tile_max > np.maximum(best, thr))
    np.maximum(best, tile_max, out=best)
    if need.size:
        arg[need] = hot[sub.T[need].argmax(axis=1)] + offset


def score_pair(
    q_t: np.ndarray,
    r: np.ndarray,
    thr: np.float32,
    buf: np.ndarray,
    block_bytes: int,
) -> int:
    """Number of mutual nearest-neighbour pairs above ``thr`` between float32 Q and R.

    ``q_t`` is Q transposed, (D, Nq) C-contiguous: sgemm reads it faster than a transposed
    view (3 to 20 % measured, more on small tiles). ``buf`` is the worker's flat float32
    scratch of at least ``block_bytes`` bytes.
    """
    rows, _, _ = _mutual(q_t, r, thr, buf, block_bytes)
    return int(rows.size)


def _mutual(
    q_t: np.ndarray, r: np.ndarray, thr: np.float32, buf: np.ndarray, block_bytes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The counted pairs: query rows i, their candidate tokens j(i), and S[i, j(i)]."""
    nq, nr = q_t.shape[1], r.shape[0]
    if nq == 0 or nr == 0:
        empty = np.zeros(0, np.intp)
        return empty, empty, np.zeros(0, np.float32)
    tr, tq = tile_shape(nq, nr, block_bytes)
    q_best = np.full(nq, -np.inf, np.float32)
    q_arg = np.zeros(nq, np.intp)
    r_best = np.full(nr, -np.inf, np.float32)
    r_arg = np.zeros(nr, np.intp)
    for q0 in range(0, nq, tq):
        q1 = min(nq, q0 + tq)
        for r0 in range(0, nr, tr):
            r1 = min(nr, r0 + tr)
            s = buf[: (r1 - r0) * (q1 - q0)].reshape(r1 - r0, q1 - q0)
            np.matmul(r[r0:r1], q_t[:, q0:q1], out=s)
            row_max = _update_lines(r_best[r0:r1], r_arg[r0:r1], s, q0)
            _update_columns(q_best[q0:q1], q_arg[q0:q1], s, row_max, r0, thr)
    rows = np.flatnonzero(q_best > thr)
    rows = rows[r_arg[q_arg[rows]] == rows]
    return rows, q_arg[rows], q_best[rows]


def mutual_pairs(
    query: np.ndarray, candidate: np.ndarray, settings: RerankSettings
) -> tuple[np.ndarray, np.ndarray]:
    """The pairs one (query, candidate) score counts, for showing them: (M, 2) int64 token
    indices (query i, candidate j) and their (M,) float32 similarities. M equals the score
    every backend gives under ``settings`` (same ties, same threshold rule)."""
    thr, block = threshold_f32(settings.threshold), settings.block_bytes
    buf = np.empty(max(1, block // _F32.itemsize), np.float32)
    q_t = np.ascontiguousarray(_as_f32(query).T)
    rows, cols, sims = _mutual(q_t, _as_f32(candidate), thr, buf, block)
    return np.stack([rows, cols], axis=1).astype(np.int64), sims


def default_workers() -> int:
    """One worker per available core when numpy's BLAS can be held to one thread, else one.

    A worker alternates an sgemm and its reductions. Two workers on two cores, each with a
    one-thread sgemm, keep both cores busy; one worker with a two-thread sgemm leaves a core
    to OpenBLAS's spinning idle thread during every reduction (measured on the 2-core dev
    machine: 1.2x the sgemm roofline against 1.3-1.9x). Two workers each calling a
    multi-threaded BLAS would oversubscribe the cores.
    """
    if _openblas_threads() is None:
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@cache
def _openblas_threads() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """(get, set) of the thread count of the OpenBLAS bundled with numpy's wheels, or None.

    OpenBLAS offers no per-thread setting (its ``openblas_set_num_threads_local`` sets the
    process-wide count), so the count is lowered for the whole process while workers run,
    as threadpoolctl does. Other BLAS builds (MKL, Accelerate, a system OpenBLAS) get None.
    """
    libs = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    for path in sorted(libs.glob("libscipy_openblas*")):
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        for suffix in ("64_", ""):
            get = getattr(lib, f"scipy_openblas_get_num_threads{suffix}", None)
            set_ = getattr(lib, f"scipy_openblas_set_num_threads{suffix}", None)
            if get is not None and set_ is not None:
                get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
                return get, set_
    return None


_blas_lock = threading.Lock()
_blas_users = 0  # calls of count_mutual_matches_many_cpu now holding BLAS to one thread
_blas_saved = 1  # the thread count to restore when the last of them returns


@contextmanager
def _one_blas_thread() -> Iterator[None]:
    """numpy's BLAS runs one thread per call inside; the previous count comes back after.

    Concurrent callers share one lowering: the first saves the count, the last restores it.
    Elsewhere in the process, BLAS calls made meanwhile also run on one thread.
    """
    controls = _openblas_threads()
    if controls is None:
        yield
        return
    get, set_ = controls
    global _blas_users, _blas_saved
    with _blas_lock:
        if _blas_users == 0:
            _blas_saved = get()
            set_(1)
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                set_(_blas_saved)


def _as_f32(a: np.ndarray) -> np.ndarray:
    """float32, C-contiguous: fp16 tokens are up-cast before any product (spec section 7)."""
    return np.ascontiguousarray(a, dtype=np.float32)


def count_mutual_matches_many_cpu(
    queries: Sequence[np.ndarray],
    candidate_lists: Sequence[Sequence[np.ndarray]],
    threshold: float = DEFAULT_THRESHOLD,
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
    q_ts = [np.ascontiguousarray(_as_f32(q).T) for q in queries]
    pairs = [
        (qi, ki, c)
        for qi, cands in enumerate(candidate_lists)
        for ki, c in enumerate(cands)
        if q_ts[qi].shape[1] and c.shape[0]
    ]
    scores = [np.zeros(len(c), np.int64) for c in candidate_lists]

    def worker() -> Callable[[tuple[int, int, np.ndarray]], None]:
        buf = np.empty(max(1, block_bytes // _F32.itemsize), np.float32)

        def score(item: tuple[int, int, np.ndarray]) -> None:
            qi, ki, r = item
            scores[qi][ki] = score_pair(q_ts[qi], _as_f32(r), thr, buf, block_bytes)

        return score

    run_pairs(pairs, worker, workers)
    return scores


def run_pairs(
    items: Sequence[T], worker: Callable[[], Callable[[T], None]], workers: int | None
) -> None:
    """Hand ``items`` to ``workers`` threads (default: ``default_workers()``), each pulling the
    next item until none is left. ``worker()`` is called once per thread and returns that
    thread's handler, so per-thread scratch lives in its closure. With several threads numpy's
    BLAS is held to one thread meanwhile; with one, BLAS keeps its own threads."""
    n_workers = min(workers or default_workers(), max(1, len(items)))
    todo, lock = iter(items), threading.Lock()

    def work() -> None:
        handle = worker()
        while True:
            with lock:
                item = next(todo, None)
            if item is None:
                return
            handle(item)

    if n_workers == 1:
        work()
    else:
        with _one_blas_thread(), ThreadPoolExecutor(n_workers) as pool:
            for f in [pool.submit(work) for _ in range(n_workers)]:
                f.result()
