"""Fused mutual-nearest-neighbour counting on the GPU (Triton): spec section 7, no K x N x N.

The published code materialises S = Q R^T for all K candidates at once (K x 3600 x 3600
float32, 4.8 GiB at K = 100) and then loops over candidates in Python. Here one launch covers
every (query, candidate) pair of a query batch; each program owns BM query rows of one pair and
walks the candidate's tokens BN at a time, computing S tiles in float16 with float32
accumulation. Each S element is computed exactly once and serves both directions:

- rows: a running max and argmax per query row (a later tile wins only when strictly greater,
  inside a tile the lowest column among the maxima), kept in registers;
- columns: per tile, each column's max and lowest arg row, packed into one int64 that orders
  like (value, -row) and merged across programs with atomic_max into a per-pair column buffer.

A second, tiny launch counts rows i with col_owner[j(i)] == i and S[i, j(i)] > threshold.
A pair whose S is not above the threshold never counts, so argmaxes and atomics are skipped for
tiles, rows and columns whose max does not pass it (exact: the kept maxima still decide ties).
Extra GPU memory is O(pairs x tokens) int64/int32 (the size of the argmax outputs), never
O(N x N). Token counts vary per set: edge tiles add -inf to padded rows and columns, so padding
never wins a max. NaN/Inf inputs raise ValueError before any launch.

Column reductions of an MMA tile cross lanes and warps (shuffles, shared memory); the
"mma"/"hybrid" modes have the tensor cores also compute S^T, whose rows are S's columns. Both
products sum the same float16 products in the same k order, so S^T[j, i] == S[i, j] is expected
bit for bit; were a GPU to round them differently, only pairs within an ulp of a tie or of the
threshold could change. Inputs exact in float16 (and tests) are unaffected either way.

This module imports neither torch nor triton at import time: `triton_available()` is cheap on
machines without them, and triton.jit wraps the kernels at first use. triton decides once per
process, when triton.language is first imported, whether it interprets kernels on the CPU
(TRITON_INTERPRET=1: tokens stay CPU tensors) or compiles them for the GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fol_infer.errors import BackendUnavailableError, UsageError
from fol_infer.rerank.cpu import threshold_f32
from fol_infer.rerank.settings import DEFAULT_THRESHOLD

if TYPE_CHECKING:
    import torch

    from fol_infer.rerank.gpu_tokens import PackedTokens

tl: Any = None  # triton.language, bound by _kernels() at first use (see the module docstring)

_BUFFER_BYTES = 256 * 2**20  # row/column scratch per launch; more pairs -> several launches
COLUMN_MODES = ("mma", "hybrid", "shuffle")


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch options; `benchmarks/rerank_gpu.py` sweeps a few on the GPU.

    The default was chosen from compiled sm_90 code, not from timings (none yet): with S^T from
    a second MMA the per-tile issue cost is below the tensor time, and 4 warps at <= 255
    registers let two programs share an SM so one's MMA overlaps the other's reductions.
    """

    block_m: int = 128  # query rows per program
    block_n: int = 64  # candidate tokens per inner step
    num_warps: int = 4
    num_stages: int = 3
    columns: str = "mma"  # column reductions: "shuffle" (of S), "mma" or "hybrid" (of S^T)
    block_count: int = 1024  # rows per step of the counting launch

    def __post_init__(self) -> None:
        sizes = (self.block_m, self.block_n, self.block_count)
        if any(b < 16 or b & (b - 1) for b in sizes) or self.columns not in COLUMN_MODES:
            raise UsageError(
                f"bad kernel config {self}: blocks must be powers of two >= 16 and columns one "
                f"of {', '.join(COLUMN_MODES)}"
            )


GPU_CONFIG = KernelConfig()
INTERPRET_CONFIG = KernelConfig(block_m=32, block_n=32, num_warps=1, num_stages=1, block_count=64)


def interpreter_active() -> bool:
    """Whether triton runs kernels in its CPU interpreter in this process. triton fixes that when
    triton.language is first imported (TRITON_INTERPRET=1 then), not per call."""
    import triton.language as lang
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(lang.zeros, InterpretedFunction)


def triton_available() -> tuple[bool, str]:
    """(usable, reason): triton and torch installed and a CUDA GPU present (the interpreter does
    not count: it is for tests). Imports torch only when both packages are installed."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'fol-infer[gpu]')"
    if importlib.util.find_spec("torch") is None:
        return False, "torch is not installed (the triton re-ranker moves tokens with torch)"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False, "TRITON_INTERPRET is set: triton would run in its CPU interpreter (tests)"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU visible to torch"
    import triton

    return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"


# --------------------------------------------------------------------------------- kernels
def _mnn_tiles(
    q_ptr,
    r_ptr,
    pair_qoff_ptr,
    pair_nq_ptr,
    pair_roff_ptr,
    pair_nr_ptr,
    row_arg_ptr,
    row_val_ptr,
    col_key_ptr,
    row_stride,
    col_stride,
    row_blocks,
    threshold,
    D: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    COLUMNS: tl.constexpr,
):
    """One program: BM query rows of one pair against all of the pair's candidate tokens."""
    pid = tl.program_id(0)
    pair = (pid // row_blocks).to(tl.int64)
    row_start = (pid % row_blocks) * BM
    nq = tl.load(pair_nq_ptr + pair)
    if row_start < nq:
        nr = tl.load(pair_nr_ptr + pair)
        q_off = tl.load(pair_qoff_ptr + pair)
        r_off = tl.load(pair_roff_ptr + pair)
        rows = row_start + tl.arange(0, BM)
        row_ok = rows < nq
        dims = tl.arange(0, D)
        q = tl.load(
            q_ptr + (q_off + rows)[:, None] * D + dims[None, :], mask=row_ok[:, None], other=0.0
        )
        row_pad = tl.where(row_ok, 0.0, float("-inf"))
        partial_rows = row_start + BM > nq
        best = tl.full([BM], float("-inf"), tl.float32)
        best_col = tl.zeros([BM], tl.int32)
        keys = col_key_ptr + pair * col_stride
        for col_start in range(0, nr, BN):
            cols = col_start + tl.arange(0, BN)
            col_ok = cols < nr
            r = tl.load(
                r_ptr + (r_off + cols)[:, None] * D + dims[None, :],
                mask=col_ok[:, None],
                other=0.0,
            )
            col_pad = tl.where(col_ok, 0.0, float("-inf"))
            edge = partial_rows | (col_start + BN > nr)
            # Padding becomes -inf, so it never wins a max; only edge tiles pay for that.
            s = tl.dot(q, tl.trans(r))
            if edge:
                s = s + (row_pad[:, None] + col_pad[None, :])
            # Rows: running max; a later tile must be strictly greater (lowest index on ties).
            # The argmax is only needed where the new max passes the threshold.
            tile_max = tl.max(s, axis=1)
            take = (tile_max > best) & (tile_max > threshold)
            best = tl.maximum(best, tile_max)
            if tl.max(take.to(tl.int32), axis=0) > 0:
                arg = tl.min(tl.where(s == tile_max[:, None], cols[None, :], 2**30), axis=1)
                best_col = tl.where(take, arg, best_col)
            # Columns: reducing S over its rows crosses lanes and warps ("shuffle"); the tensor
            # cores can instead compute S^T (the same products) so that the reduction runs
            # along rows, inside threads: always ("mma") or only for tiles where some column
            # passes the threshold ("hybrid").
            if COLUMNS == "mma":
                st = tl.dot(r, tl.trans(q))
                if edge:
                    st = st + (col_pad[:, None] + row_pad[None, :])
                col_max = tl.max(st, axis=1)
            else:
                col_max = tl.max(s, axis=0)
            # (max, lowest row) -> int64 ordered like (value, -row), merged by atomic max;
            # columns whose max does not pass the threshold can never count.
            if tl.max(col_max, axis=0) > threshold:
                if COLUMNS == "hybrid":
                    st = tl.dot(r, tl.trans(q))
                    if edge:
                        st = st + (col_pad[:, None] + row_pad[None, :])
                    col_max = tl.max(st, axis=1)  # from S^T, so that the argmin finds it
                if COLUMNS == "shuffle":
                    col_arg = tl.min(tl.where(s == col_max[None, :], rows[:, None], 2**30), axis=0)
                else:
                    col_arg = tl.min(tl.where(st == col_max[:, None], rows[None, :], 2**30), axis=1)
                col_max = tl.where(col_max == 0.0, 0.0, col_max)  # -0.0 and +0.0 must tie
                bits = col_max.to(tl.int32, bitcast=True)
                bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # float order -> signed int order
                key = (bits.to(tl.int64) << 32) | (0x7FFFFFFF - col_arg).to(tl.int64)
                live = col_ok & (col_max > threshold)
                tl.atomic_max(keys + cols, key, mask=live, sem="relaxed")
        out = pair * row_stride + rows
        tl.store(row_arg_ptr + out, best_col, mask=row_ok)
        tl.store(row_val_ptr + out, best, mask=row_ok)


def _mnn_count(
    row_arg_ptr,
    row_val_ptr,
    col_key_ptr,
    pair_nq_ptr,
    counts_ptr,
    row_stride,
    col_stride,
    threshold,
    BLOCK: tl.constexpr,
):
    """One program per pair: rows whose best column picks them back, above the threshold."""
    pair = tl.program_id(0).to(tl.int64)
    nq = tl.load(pair_nq_ptr + pair)
    total = tl.zeros([BLOCK], tl.int32)
    for start in range(0, nq, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        ok = rows < nq
        col = tl.load(row_arg_ptr + pair * row_stride + rows, mask=ok, other=0)
        val = tl.load(row_val_ptr + pair * row_stride + rows, mask=ok, other=0.0)
        key = tl.load(col_key_ptr + pair * col_stride + col, mask=ok, other=0)
        owner = 0x7FFFFFFF - key.to(tl.int32)  # low word holds 0x7FFFFFFF - row
        total += (ok & (owner == rows) & (val > threshold)).to(tl.int32)
    tl.store(counts_ptr + pair, tl.sum(total, axis=0))


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """Wrap the kernels at first use, so that importing this module never imports triton."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_mnn_tiles), triton.jit(_mnn_count)


# ------------------------------------------------------------------------------ host side
def _device(inputs: Sequence[object]) -> torch.device:
    """Interpreter: CPU. Otherwise the device of the first CUDA tensor, else the current GPU."""
    if importlib.util.find_spec("triton") is None:
        raise BackendUnavailableError(f"{triton_available()[1]}; or use backend='cpu'")
    import torch

    if interpreter_active():
        return torch.device("cpu")
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_cuda:
            return x.device
    ok, why = triton_available()
    if not ok:
        raise BackendUnavailableError(
            f"the triton re-ranker needs a CUDA GPU: {why}; use backend='cpu' "
            "(or TRITON_INTERPRET=1 to run the kernel on the CPU, slowly)"
        )
    return torch.device("cuda", torch.cuda.current_device())


def _threshold_below(threshold: float) -> float:
    """The float32 t with (x > t) == (x > threshold) for every float32 x (see threshold_f32)."""
    if math.isnan(threshold):
        raise UsageError("threshold is NaN: pass a number, e.g. 0.7")
    return float(threshold_f32(threshold))


def _max_pairs(config: KernelConfig, max_nq: int, max_nr: int) -> int:
    rows = math.ceil(max_nq / config.block_m) * config.block_m
    per_pair = 8 * rows + 8 * max(1, max_nr)
    return max(1, _BUFFER_BYTES // per_pair)


def count_pairs(
    queries: PackedTokens,
    candidates: PackedTokens,
    pair_query: torch.Tensor | np.ndarray,
    pair_candidate: torch.Tensor | np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    *,
    config: KernelConfig | None = None,
    max_pairs_per_launch: int | None = None,
) -> torch.Tensor:
    """Counts for pairs (queries[pair_query[p]], candidates[pair_candidate[p]]) as int32 (P,) on
    the tokens' device; a pair_candidate outside [0, len(candidates)) means no candidate
    (count 0). No host sync: the pair tables are built on the device, grid and buffers are sized
    from the max_count bounds."""
    import torch

    device = queries.tokens.device
    if candidates.tokens.device != device:
        raise UsageError("queries and candidates must be on the same device")
    if queries.tokens.shape[1] != candidates.tokens.shape[1]:
        raise UsageError(
            f"query tokens are {queries.tokens.shape[1]} wide, candidates "
            f"{candidates.tokens.shape[1]}: use one encoder for both"
        )
    interpret = interpreter_active()
    if interpret != (device.type == "cpu"):
        raise BackendUnavailableError(
            f"tokens on {device} but triton {'interprets' if interpret else 'compiles'} kernels: "
            "use CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton's import"
        )
    config = config or (INTERPRET_CONFIG if interpret else GPU_CONFIG)
    thr = _threshold_below(threshold)
    pair_query = torch.as_tensor(pair_query, device=device).to(torch.int64).reshape(-1)
    pair_candidate = torch.as_tensor(pair_candidate, device=device).to(torch.int64).reshape(-1)
    n_pairs = int(pair_query.shape[0])
    counts = torch.zeros(n_pairs, dtype=torch.int32, device=device)
    if n_pairs == 0 or queries.max_count == 0 or candidates.max_count == 0:
        return counts

    has_r = (pair_candidate >= 0) & (pair_candidate < len(candidates))
    r = torch.where(has_r, pair_candidate, 0)
    pair_nr = torch.where(has_r, candidates.counts[r], 0).to(torch.int32)
    pair_roff = candidates.offsets[r]
    pair_qoff = queries.offsets[pair_query]
    pair_nq = torch.where(pair_nr > 0, queries.counts[pair_query], 0).to(torch.int32)

    row_blocks = math.ceil(queries.max_count / config.block_m)
    row_stride = row_blocks * config.block_m
    col_stride = candidates.max_count
    chunk = max_pairs_per_launch or _max_pairs(config, queries.max_count, col_stride)
    chunk = min(chunk, (2**31 - 1) // row_blocks, n_pairs)
    row_arg = torch.empty(chunk * row_stride, dtype=torch.int32, device=device)
    row_val = torch.empty(chunk * row_stride, dtype=torch.float32, device=device)
    col_key = torch.empty(chunk * col_stride, dtype=torch.int64, device=device)
    tiles, count = _kernels()
    dim = int(queries.tokens.shape[1])
    for start in range(0, n_pairs, chunk):
        p = slice(start, min(n_pairs, start + chunk))
        n = p.stop - p.start
        col_key.fill_(torch.iinfo(torch.int64).min)
        tiles[(n * row_blocks,)](
            queries.tokens,
            candidates.tokens,
            pair_qoff[p],
            pair_nq[p],
            pair_roff[p],
            pair_nr[p],
            row_arg,
            row_val,
            col_key,
            row_stride,
            col_stride,
            row_blocks,
            thr,
            D=dim,
            BM=config.block_m,
            BN=config.block_n,
            COLUMNS=config.columns,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
        count[(n,)](
            row_arg,
            row_val,
            col_key,
            pair_nq[p],
            counts[p],
            row_stride,
            col_stride,
            thr,
            BLOCK=config.block_count,
            num_warps=4,
        )
    return counts


def count_mutual_matches_grid(
    queries: PackedTokens,
    candidates: PackedTokens,
    rows: torch.Tensor | np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    **kwargs: Any,
) -> torch.Tensor:
    """(Q, K) int32 counts where rows[q, k] is the candidates' set of query q's k-th candidate
    (-1: none). With `ResidentTokens.rows(ids)` on GPU search output nothing leaves the GPU;
    kwargs go to `count_pairs` (config, max_pairs_per_launch)."""
    import torch

    device = queries.tokens.device
    rows = torch.as_tensor(rows, device=device).to(torch.int64)
    if rows.ndim != 2 or rows.shape[0] != len(queries):
        raise UsageError(f"rows must be ({len(queries)}, K) for {len(queries)} queries")
    n_q, k = rows.shape
    pair_query = torch.arange(n_q, device=device).repeat_interleave(k)
    counts = count_pairs(queries, candidates, pair_query, rows.reshape(-1), threshold, **kwargs)
    return counts.view(n_q, k)


def count_mutual_matches_many_triton(
    queries: Sequence[np.ndarray | torch.Tensor],
    candidate_lists: Sequence[Sequence[np.ndarray | torch.Tensor]],
    threshold: float = DEFAULT_THRESHOLD,
    *,
    config: KernelConfig | None = None,
    max_pairs_per_launch: int | None = None,
) -> list[np.ndarray]:
    """Spec section 7 counts, one int64 (K_q,) array per query, for all pairs in one launch.

    Inputs may be numpy (copied once; a candidate object shared by several queries is copied
    once) or CUDA torch tensors (packed on their device). NaN/Inf -> ValueError.
    """
    from fol_infer.rerank.gpu_tokens import pack_tokens

    if len(queries) != len(candidate_lists):
        raise UsageError(
            f"{len(queries)} queries but {len(candidate_lists)} candidate lists: pass one per query"
        )
    if not queries:
        return []
    unique: dict[int, int] = {}
    sets: list[np.ndarray | torch.Tensor] = []
    pair_candidate: list[int] = []
    for cands in candidate_lists:
        for c in cands:
            if id(c) not in unique:
                unique[id(c)] = len(sets)
                sets.append(c)
            pair_candidate.append(unique[id(c)])
    device = _device([*queries, *sets])
    packed_q = pack_tokens(queries, device, what="query")
    packed_c = pack_tokens(sets, device, what="candidate")
    sizes = [len(c) for c in candidate_lists]
    pair_query = np.repeat(np.arange(len(queries)), sizes)
    counts = count_pairs(
        packed_q,
        packed_c,
        pair_query,
        np.asarray(pair_candidate, np.int64),
        threshold,
        config=config,
        max_pairs_per_launch=max_pairs_per_launch,
    )
    flat = counts.cpu().numpy().astype(np.int64)
    return np.split(flat, np.cumsum(sizes)[:-1])
