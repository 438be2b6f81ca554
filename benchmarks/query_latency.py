"""Index build throughput and query latency (global only; re-ranked at K = 10 and 100).

    python benchmarks/query_latency.py [--arch vitb14] [--resolution 322] [--places 60] \
        [--queries 8] [--tokens fp16,int8-exact] [--json PATH]

Uses an UNTRAINED seeded checkpoint and a synthetic database large enough for K = 100, so the
figures are about speed only. Everything runs in this process, one configuration after the
other on the same index (one index per token format, the same queries), so the ratios between
them are what to read.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import parser, settings, write_report
from untrained_setup import untrained_setup

from fol_infer.backends import open_encoder
from fol_infer.bundle import Bundle
from fol_infer.choices import RerankBackend
from fol_infer.index.build import BuildSettings, build_index
from fol_infer.index.database import Database
from fol_infer.pipeline import STAGES, Retriever
from fol_infer.rerank import RerankSettings


def measure(
    bundle: Bundle, db_dir: Path, index: Path, queries: list[Path], fmt: str, batch: int
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Build an index with token format ``fmt``; time queries against it."""
    with open_encoder(bundle) as encoder:  # type: ignore[attr-defined]
        build = build_index(
            bundle,
            encoder,
            db_dir,
            index,
            BuildSettings(batch=batch, tokens=fmt),  # type: ignore[arg-type]
        )
    with Database(index) as database:
        n_db, store = len(database), database.tokens.bytes_per_image
        if database.exact_tokens is not None:
            store += database.exact_tokens.bytes_per_image
    built = {
        "images": n_db,
        "images_per_s": build.images_per_second,
        "batch": batch,
        "token_bytes_per_image": store,
    }
    print(
        f"[{fmt}] index: {n_db} images at {build.images_per_second:.2f} img/s (batch {batch}); "
        f"tokens {store / 2**20:.3f} MiB/image on disk"
    )
    rows = {}
    with Retriever(bundle, index, rerank=RerankSettings(backend=RerankBackend.CPU)) as retriever:
        retriever.query([queries[0]], top_k=10, rerank_k=10)  # warm-up
        for name, rerank, k in (
            ("global only", False, 10),
            ("re-rank K=10", True, 10),
            ("re-rank K=100", True, 100),
        ):
            totals, stages = [], {s: [] for s in STAGES}
            for q in queries:
                start = time.perf_counter()
                (result,) = retriever.query([q], top_k=10, rerank_k=min(k, n_db), rerank=rerank)
                totals.append((time.perf_counter() - start) * 1e3)
                for s in STAGES:
                    stages[s].append(result.timings_ms[s])
            rows[name] = {"total_p50_ms": statistics.median(totals)} | {
                f"{s}_p50_ms": statistics.median(v) for s, v in stages.items()
            }
            r = rows[name]
            print(
                f"[{fmt}] {name:14s}: total p50 {r['total_p50_ms']:8.1f} ms | "
                + " ".join(f"{s} {r[f'{s}_p50_ms']:.1f}" for s in STAGES)
            )
    return built, rows


def options() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("--arch", default="vitb14")
    p.add_argument("--resolution", type=int, default=322)
    p.add_argument("--places", type=int, default=60)
    p.add_argument("--distractors", type=int, default=40)
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", default="fp16", help="token formats to compare, comma separated")
    return p


def main() -> None:
    args = options().parse_args()

    report: dict[str, object] = {"settings": settings(args)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle, db_dir, queries = untrained_setup(
            work, args.arch, args.resolution, args.places, args.distractors, args.queries
        )
        report["index"], report["queries"] = {}, {}
        for fmt in args.tokens.split(","):
            index = work / f"index-{fmt}"
            report["index"][fmt], report["queries"][fmt] = measure(  # type: ignore[index]
                bundle, db_dir, index, queries, fmt, args.batch
            )
    write_report(args.json, report)


if __name__ == "__main__":
    main()
