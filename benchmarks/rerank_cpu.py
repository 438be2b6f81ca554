"""CPU re-ranking: our bounded-memory numpy backend against the sgemm roofline and the published
torch formulation, all measured in this run on this machine.

    python benchmarks/rerank_cpu.py [--quick] [--json PATH]

Per query, the work is 2 * sum_k(Nq * Nr_k) * 128 FLOPs of sgemm; the roofline time is that
divided by the FLOP/s of one large float32 matmul, measured at the start and at the end of the
run (the better rate is used: the stricter roofline). Times are the best of a few runs: the
machine may be shared, and the best run is the least disturbed; each timed row also records
the CPU seconds per wall second of that run (2.0 = both cores were ours throughout).

Peak memory is measured in a fresh subprocess per implementation and case: the peak resident
set (VmHWM, reset through /proc/self/clear_refs just before the call) minus the resident set
just before the call, so the inputs both implementations share are not counted and torch's
allocations are seen (tracemalloc would miss them).

Data: random unit vectors, lengths drawn in 3,300..3,500 (--tokens), with near-duplicates of
0..30 % of a query's tokens planted in the candidates that show its place, so that matches,
and the argmax work they cause, exist as in real retrieval. In the batch case, 16 queries draw
their K candidates from one shared pool of 2K database images.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import parser, settings, write_report  # noqa: E402

from fol_infer.bench.environment import cpu_model  # noqa: E402
from fol_infer.rerank.cpu import (  # noqa: E402
    DEFAULT_BLOCK_BYTES,
    count_mutual_matches_many_cpu,
    default_workers,
)

DIM = 128
Lists = list[list[np.ndarray]]
T = TypeVar("T")


@dataclass(frozen=True)
class Spec:
    name: str
    queries: int
    k: int
    repeats: int  # timed runs of ours (best kept); the published one gets fewer
    torch_repeats: int


FULL = [Spec("K=100", 1, 100, 3, 2), Spec("K=10", 1, 10, 5, 3), Spec("16 queries", 16, 100, 1, 1)]
QUICK = [Spec("K=20", 1, 20, 2, 1), Spec("K=5", 1, 5, 2, 1), Spec("4 queries", 4, 10, 1, 1)]


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def plant(rng: np.random.Generator, query: np.ndarray, cand: np.ndarray, share: float) -> None:
    """Overwrite a share of ``cand`` with noisy copies of query tokens (cosine ~0.95)."""
    m = int(share * min(len(query), len(cand)))
    src = rng.choice(len(query), m, replace=False)
    dst = rng.choice(len(cand), m, replace=False)
    dup = query[src] + 0.03 * rng.standard_normal((m, DIM), dtype=np.float32)
    cand[dst] = dup / np.linalg.norm(dup, axis=1, keepdims=True)


def make_case(seed: int, spec: Spec, tokens: tuple[int, int]) -> tuple[list[np.ndarray], Lists]:
    """Queries and their candidate lists; a pool image shows the place of one query."""
    rng = np.random.default_rng(seed)
    lo, hi = tokens
    queries = [unit_rows(rng, int(rng.integers(lo, hi + 1))) for _ in range(spec.queries)]
    pool_size = spec.k if spec.queries == 1 else 2 * spec.k
    pool = [unit_rows(rng, int(rng.integers(lo, hi + 1))) for _ in range(pool_size)]
    for p, image in enumerate(pool):  # shares fall with the rank, as in a top-K list
        plant(rng, queries[p % spec.queries], image, 0.3 * (1 - p / pool_size))
    if spec.queries == 1:
        return queries, [pool]
    return queries, [
        [pool[i] for i in rng.choice(pool_size, spec.k, replace=False)] for _ in queries
    ]


def pair_flops(queries: Sequence[np.ndarray], lists: Lists) -> float:
    return float(
        sum(2 * len(q) * len(c) * DIM for q, cs in zip(queries, lists, strict=True) for c in cs)
    )


def best_run(fn: Callable[[], T], repeats: int) -> tuple[float, float, T]:
    """(best wall seconds, CPU seconds per wall second of that run, result of the last run)."""
    runs = []
    for _ in range(max(1, repeats)):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        runs.append((time.perf_counter() - wall, time.process_time() - cpu))
    best, cpu = min(runs)
    return best, cpu / best, out


def sgemm_flops(n: int) -> tuple[float, float]:
    """(FLOP/s, CPU utilisation) of an n x n x n float32 matmul, best of 3 after a warm-up."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # BLAS threads started, pages touched
    t, util, _ = best_run(lambda: a @ b, 3)
    return 2 * n**3 / t, util


def run_impl(impl: str, queries: list[np.ndarray], lists: Lists, args: argparse.Namespace):
    if impl == "ours":
        return count_mutual_matches_many_cpu(
            queries, lists, 0.7, block_bytes=args.block_bytes, workers=args.workers
        )
    from fol_infer.rerank.torch_published import count_mutual_matches_many_torch

    return count_mutual_matches_many_torch(queries, lists, 0.7, device="cpu")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_child(args: argparse.Namespace, impl: str, seed: int, spec: Spec) -> int:
    """Extra peak resident bytes of one call of ``impl``, measured in a fresh process."""
    cmd = [sys.executable, __file__, "--_peak", f"{impl},{seed},{spec.queries},{spec.k}"]
    cmd += ["--tokens", f"{args.tokens[0]},{args.tokens[1]}"]
    cmd += ["--block-bytes", str(args.block_bytes), "--workers", str(args.workers)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1])


def _peak_main(args: argparse.Namespace) -> None:
    """Child side of peak_child: build the case, reset the high-water mark, run once."""
    impl, seed, n_queries, k = args._peak.split(",")
    queries, lists = make_case(int(seed), Spec("", int(n_queries), int(k), 1, 1), args.tokens)
    if impl == "torch":
        import torch  # imported first: the import is not the formulation's memory

        torch.zeros(1)
    else:
        np.ones((64, 64), np.float32) @ np.ones((64, 64), np.float32)  # BLAS started
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    run_impl(impl, queries, lists, args)
    print((_status_kib("VmHWM") - before) * 1024)


def measure(args: argparse.Namespace, spec: Spec, seed: int) -> dict:
    """One row of the table: ours vs published, time per query, peak memory."""
    queries, lists = make_case(seed, spec, args.tokens)
    n_q = spec.queries
    row: dict = {"case": spec.name, "queries": n_q, "k": spec.k}
    row["flops_per_query"] = pair_flops(queries, lists) / n_q
    t, util, ours = best_run(lambda: run_impl("ours", queries, lists, args), spec.repeats)
    row |= {"ours_s": t / n_q, "ours_cpu_util": util, "runs": spec.repeats}
    row["ours_peak_bytes"] = peak_child(args, "ours", seed, spec)
    row["mean_score"] = float(np.mean([s.mean() for s in ours]))
    if args.no_torch:
        return row
    t, util, published = best_run(
        lambda: run_impl("torch", queries, lists, args), spec.torch_repeats
    )
    if not all(np.array_equal(a, b) for a, b in zip(ours, published, strict=True)):
        raise SystemExit(f"{spec.name}: scores differ between ours and the published formulation")
    row |= {"published_s": t / n_q, "published_cpu_util": util, "speedup": t / n_q / row["ours_s"]}
    row["published_peak_bytes"] = peak_child(args, "torch", seed, spec)
    row["memory_ratio"] = row["ours_peak_bytes"] / row["published_peak_bytes"]
    return row


def print_table(rows: Sequence[dict], gflops: float) -> None:
    print(f"\nsgemm roofline at {gflops / 1e9:.1f} GFLOP/s; times are seconds per query")
    cols = ["case", "roofline", "ours", "/roof", "published", "speedup", "ours MiB", "publ MiB"]
    print("".join(f"{c:>11}" for c in cols) + f"{'mem ratio':>11}")
    for r in rows:
        cells = [r["case"], f"{r['roofline_s']:.3f}", f"{r['ours_s']:.3f}"]
        cells += [f"{r['ours_over_roofline']:.2f}"]
        if "published_s" in r:
            cells += [f"{r['published_s']:.3f}", f"{r['speedup']:.2f}x"]
            cells += [f"{r['ours_peak_bytes'] / 2**20:.1f}"]
            cells += [f"{r['published_peak_bytes'] / 2**20:.1f}", f"{r['memory_ratio']:.4f}"]
        else:
            cells += ["-", "-", f"{r['ours_peak_bytes'] / 2**20:.1f}", "-", "-"]
        print("".join(f"{c:>11}" for c in cells))


def options() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("--quick", action="store_true", help="small smoke sizes (seconds)")
    p.add_argument("--no-torch", action="store_true", help="skip the published baseline")
    p.add_argument("--tokens", type=lambda s: tuple(int(x) for x in s.split(",")), default=None)
    p.add_argument("--block-bytes", type=int, default=DEFAULT_BLOCK_BYTES)
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--_peak", help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = options().parse_args()
    if args.tokens is None:
        args.tokens = (300, 400) if args.quick else (3300, 3500)
    if args._peak:
        _peak_main(args)
        return
    if not args.no_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("torch is not installed: skipping the published baseline")
            args.no_torch = True
    load_start = os.getloadavg()[0]
    n = 1024 if args.quick else 4096
    gflops, util = sgemm_flops(n)
    print(f"sgemm {n}^3: {gflops / 1e9:.1f} GFLOP/s, {util:.2f} CPU/wall ({cpu_model()})")
    rows = []
    for seed, spec in enumerate(QUICK if args.quick else FULL):
        rows.append(measure(args, spec, seed))
        print(f"  {spec.name}: ours {rows[-1]['ours_s']:.3f} s/query", flush=True)
    end, end_util = sgemm_flops(n)
    print(f"sgemm again: {end / 1e9:.1f} GFLOP/s, {end_util:.2f} CPU/wall")
    gflops = max(gflops, end)
    for r in rows:
        r["roofline_s"] = r["flops_per_query"] / gflops
        r["ours_over_roofline"] = r["ours_s"] / r["roofline_s"]
    print_table(rows, gflops)
    report = {"settings": settings(args), "load_average_1_min_at_start": load_start}
    write_report(args.json, report | {"sgemm_gflops": gflops / 1e9, "rows": rows})


if __name__ == "__main__":
    main()
