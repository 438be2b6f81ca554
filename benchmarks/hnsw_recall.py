"""Recall of HNSW global search: one graph against a map's shards, each with its own graph.

    python benchmarks/hnsw_recall.py [--images 20000] [--dim 256] [--centres 300] \
        [--queries 500] [--spread 1,2] [--shards 1,4,8] [--ef 16,64,256] \
        [--factory HNSW32] [--layouts shuffled,grouped] [--json PATH]

Data (seeded): `--centres` random unit centres; each database vector is a centre plus
Gaussian noise of norm `--spread` (each value a separate run), normalised: cosine
1/sqrt(1 + spread^2) to its centre and about 1/(1 + spread^2) between two of a cluster (0.5 at
spread 1, 0.2 at 2). Each query is a random database vector plus noise of norm spread/2,
normalised. Unrelated vectors score about +-1/sqrt(dim), so a spread is harder at a small dim
than at 8448 (there, spread 5 is about as hard as spread 2 at dim 256).

Layouts: "shuffled" stores the vectors in random order, so every shard holds part of every
cluster; "grouped" stores them cluster by cluster (as a database sorted along a route), so a
cluster sits in one or two shards.

Indexes are the product's own: ``GlobalIndex`` with `--factory`, `ef_search` set through
``set_search_params``. S shards are S contiguous ranges of the database, each its own
``GlobalIndex``; their top lists (global ids: shard offset + local id) are merged with
``index.shards.merge_top_k`` as a map's query does (S = 1: the single index). The truth is
the exact Flat ``GlobalIndex``. recall@k: the share of the exact top-k ids found in the
returned top k, averaged over the queries. Search time: ms per query for the whole batch of
queries, shards searched one after the other in this process.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import parser, settings, write_report

from fol_infer.index.global_index import GlobalIndex
from fol_infer.index.shards import merge_top_k

K = 10


def normalised(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def dataset(
    rng: np.random.Generator, n: int, dim: int, centres: int, nq: int, spread: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(database, cluster of each vector, queries), as the module doc describes."""
    c = normalised(rng.standard_normal((centres, dim)))
    cluster = rng.integers(0, centres, n)
    db = normalised(c[cluster] + spread / np.sqrt(dim) * rng.standard_normal((n, dim)))
    near = db[rng.integers(0, n, nq)]
    q = normalised(near + spread / 2 / np.sqrt(dim) * rng.standard_normal((nq, dim)))
    return db, cluster, q


def built(factory: str, x: np.ndarray) -> tuple[GlobalIndex, float]:
    start = time.perf_counter()
    index = GlobalIndex.create(x.shape[1], factory, device="cpu")
    index.add(x)
    return index, time.perf_counter() - start


def recall(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    hits = [len(set(f[:k]) & set(e[:k])) for f, e in zip(found, exact)]
    return float(np.mean(hits)) / k


def sharded(
    factory: str, db: np.ndarray, s: int, efs: list[int], q: np.ndarray, exact: np.ndarray
) -> dict:  # type: ignore[type-arg]
    """Build S shards, search them at each ef, merge as a map does, score against `exact`."""
    bounds = np.linspace(0, len(db), s + 1).astype(int)
    shards, build_s = [], 0.0
    for a, b in zip(bounds, bounds[1:]):
        index, seconds = built(factory, db[a:b])
        shards.append((index, int(a)))
        build_s += seconds
    rows = []
    for ef in efs:
        start = time.perf_counter()
        parts = []
        for index, offset in shards:
            index.set_search_params(ef_search=ef)
            scores, ids = index.search(q, min(K, len(index)))
            parts.append((scores, np.where(ids >= 0, ids + offset, -1)))
        if len(parts) == 1:
            scores, ids = parts[0]
        else:
            scores, ids = merge_top_k(parts, K, len(q))
        ms = (time.perf_counter() - start) * 1e3 / len(q)
        rows.append(
            {"ef_search": ef, "recall@1": recall(ids, exact, 1), "recall@10": recall(ids, exact, K)}
            | {"ms_per_query": ms}
        )
    return {"shards": s, "build_s": build_s, "rows": rows}


def options() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--centres", type=int, default=300)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--spread", default="1,2")
    p.add_argument("--shards", default="1,4,8")
    p.add_argument("--ef", default="16,64,256")
    p.add_argument("--factory", default="HNSW32")
    p.add_argument("--layouts", default="shuffled,grouped")
    p.add_argument("--seed", type=int, default=0)
    return p


def main() -> None:
    args = options().parse_args()

    efs = [int(v) for v in args.ef.split(",")]
    results = []
    for spread in (float(v) for v in args.spread.split(",")):
        rng = np.random.default_rng(args.seed)
        db, cluster, q = dataset(rng, args.images, args.dim, args.centres, args.queries, spread)
        for layout in args.layouts.split(","):
            grouped = layout == "grouped"
            x = db[np.argsort(cluster, kind="stable")] if grouped else db
            exact = built("Flat", x)[0].search(q, K)[1]
            print(f"\n{layout}, spread {spread}: {args.images} images of dim {args.dim}, k = {K}")
            print("  shards  ef_search  recall@1  recall@10  ms/query  (build s)")
            for s in (int(v) for v in args.shards.split(",")):
                out = sharded(args.factory, x, s, efs, q, exact)
                for r in out["rows"]:
                    print(
                        f"  {s:6d} {r['ef_search']:10d} {r['recall@1']:9.3f} "
                        f"{r['recall@10']:10.3f} {r['ms_per_query']:9.2f}  ({out['build_s']:.1f})"
                    )
                results.append({"spread": spread, "layout": layout} | out)
    write_report(args.json, {"k": K, "settings": settings(args), "results": results})


if __name__ == "__main__":
    main()
