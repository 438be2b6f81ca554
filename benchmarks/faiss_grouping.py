"""CPU search of the global index: the product's path against one plain FAISS call per batch.

    python benchmarks/faiss_grouping.py [--images 2000,10000] [--dim 8448] \
        [--batches 1,8,64,256] [--k 10,100] [--ivf IVF64,Flat] [--rounds 7] [--json PATH]

Database: `--images` seeded random unit vectors of `--dim` (the global descriptor's size), in
a "Flat" GlobalIndex and, for `--ivf` (empty: none), in that factory at its default nprobe.
Queries: seeded random unit vectors, batches of each `--batches` size. Per batch and k, in
the same process, round after round (methods interleaved, the first one rotating), the
median over `--rounds` of the ms per query and of each round's ratio to plain:

- product: ``GlobalIndex.search``. Flat: FAISS's search selects candidates, FAISS's
  per-pair kernel scores them (`fol_infer.index.exact_flat`); other factories: FAISS in
  groups of 8 queries;
- groups of 8: the raw FAISS index searched 8 queries at a time (FAISS's query-by-query
  path, except for fewer queries than threads over 10,000+ vectors);
- plain: one FAISS call on the whole batch (BLAS products from 16 queries of dim 8448).

"same as groups" says whether the product's ids and scores (bit for bit) equal those of
groups of 8, the product's CPU path for every factory before `exact_flat` (Flat: they differ
where scores are equal, and where FAISS took BLAS for fewer queries than threads).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
from common import parser, settings, write_report

from fol_infer.index.global_index import GlobalIndex

Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build(factory: str, db: np.ndarray) -> GlobalIndex:
    index = GlobalIndex.create(db.shape[1], factory, device="cpu")
    for a in range(0, len(db), 1000):
        index.add(db[a : a + 1000])
    index.search(db[:1], 1)  # trains what is buffered
    return index


def methods(index: GlobalIndex) -> dict[str, Search]:
    raw = index._index  # the FAISS index itself, for the two baselines

    def groups_of_8(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        parts = [raw.search(q[a : a + 8], k) for a in range(0, len(q), 8)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    return {"product": index.search, "groups of 8": groups_of_8, "plain": raw.search}


def measure(
    index: GlobalIndex, queries: np.ndarray, batches: list[int], ks: list[int], rounds: int
) -> list[dict]:  # type: ignore[type-arg]
    """Median ms per query of each method, per (batch, k), and the median over rounds of its
    ratio to plain in the same round; methods interleaved, in a rotating order."""
    runs = methods(index)
    samples: dict[tuple[int, int, str], list[float]] = {}
    answers: dict[tuple[int, int, str], tuple[np.ndarray, np.ndarray]] = {}
    for b in batches:  # warm-up: page cache, FAISS's threads, the norm bound
        index.search(queries[:b], ks[0])
    names = list(runs)
    for r in range(rounds):
        turn = names[r % len(names) :] + names[: r % len(names)]  # who goes first rotates
        for b in batches:
            for k in ks:
                for name in turn:
                    fn = runs[name]
                    start = time.perf_counter()
                    answer = fn(queries[:b], k)
                    samples.setdefault((b, k, name), []).append(time.perf_counter() - start)
                    answers[(b, k, name)] = answer
    rows = []
    for b in batches:
        for k in ks:
            ms = {n: statistics.median(samples[(b, k, n)]) * 1e3 / b for n in runs}
            plain = samples[(b, k, "plain")]
            ratios = {
                n: statistics.median(t / p for t, p in zip(samples[(b, k, n)], plain)) for n in runs
            }
            (scores, ids), (g_scores, g_ids) = (
                answers[(b, k, "product")],
                answers[(b, k, "groups of 8")],
            )
            same = {"same_ids": bool(np.array_equal(ids, g_ids))}
            same["same_scores"] = bool(
                np.array_equal(scores.view(np.uint32), g_scores.view(np.uint32))
            )
            rows.append({"batch": b, "k": k, "ms_per_query": ms, "ratio_to_plain": ratios} | same)
    return rows


def report(title: str, rows: list[dict]) -> None:  # type: ignore[type-arg]
    print(f"\n{title}: ms per query (median), ratio to plain (median of the rounds' ratios)")
    print(
        "  batch     k    product   groups of 8      plain   product/plain  groups/plain"
        "  same as groups: ids, scores"
    )
    for r in rows:
        ms, ratio = r["ms_per_query"], r["ratio_to_plain"]
        print(
            f"  {r['batch']:5d} {r['k']:5d} {ms['product']:10.2f} {ms['groups of 8']:13.2f} "
            f"{ms['plain']:10.2f} {ratio['product']:14.2f}x {ratio['groups of 8']:12.2f}x  "
            f"{'yes' if r['same_ids'] else 'no':>4s} {'yes' if r['same_scores'] else 'no':>4s}"
        )


def options() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("--images", default="2000,10000")
    p.add_argument("--dim", type=int, default=8448)
    p.add_argument("--batches", default="1,8,64,256")
    p.add_argument("--k", default="10,100")
    p.add_argument("--ivf", default="IVF64,Flat")
    p.add_argument("--rounds", type=int, default=7)
    return p


def main() -> None:
    args = options().parse_args()
    import faiss

    sizes = [int(v) for v in args.images.split(",")]
    batches = [int(v) for v in args.batches.split(",")]
    ks = [int(v) for v in args.k.split(",")]
    factories = ["Flat"] + ([args.ivf] if args.ivf else [])
    rng = np.random.default_rng(0)
    queries = unit(rng, max(batches), args.dim)
    results = []
    for n in sizes:
        db = unit(rng, n, args.dim)
        for factory in factories:
            index = build(factory, db)
            rows = measure(index, queries, batches, [k for k in ks if k <= n], args.rounds)
            report(f"{factory}, {n} images of dim {args.dim}", rows)
            results.append({"factory": factory, "images": n, "rows": rows})
            del index
    threads = {"faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads()}
    write_report(args.json, threads | {"settings": settings(args), "results": results})


if __name__ == "__main__":
    main()
