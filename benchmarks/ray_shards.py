"""Maps on Ray against the in-process map: fan-out overhead per query, build throughput.

    python benchmarks/ray_shards.py [--arch vits14] [--resolution 224] [--places 24] \
        [--shards 4,8] [--build-shards 8] [--queries 20] [--json PATH]

Uses an UNTRAINED seeded checkpoint and a synthetic database: the figures are about speed.
Query side: one map of `--shards` shards, served in this process and by one Ray actor per
shard (`open_shard_set` without and with ``ray=``), once through the compiled graph and once
with one actor call per shard, fed the same encoded queries, in turn, so that the differences
are the fan-out (channels or actor calls, merge), not the encoder. Build side: the same
database as an in-process map, then on a local Ray cluster of 1 and of 2 workers (one CPU
and one encoder thread per task), each from scratch. Ratios against the in-process run of the
same process are what to read; the machine is shared.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import parser, settings, write_report
from untrained_setup import untrained_setup

from fol_infer.backends import open_encoder
from fol_infer.bundle import Bundle
from fol_infer.choices import RerankBackend
from fol_infer.images import preprocess
from fol_infer.index.build import BuildSettings
from fol_infer.index.map_build import LocalRunner, build_map
from fol_infer.pipeline import Timer, open_shard_set
from fol_infer.rerank import RerankSettings
from fol_infer.shard_set import ShardSet


def build_rates(bundle: Bundle, db: Path, work: Path, shards: int, batch: int) -> dict[str, float]:
    """Images per second: in-process, then Ray with 1 and 2 workers."""
    import ray

    from fol_infer.distributed.build import RayRunner

    build = BuildSettings(batch=batch)
    rates: dict[str, float] = {}
    with open_encoder(bundle) as encoder:  # type: ignore[attr-defined]
        report = build_map(bundle, db, work / "local", LocalRunner(encoder), build, shards)
    rates["in_process"] = report.images_per_second
    for workers in (1, 2):
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        try:
            runner = RayRunner("auto", cpus=1, decode_threads=1)
            out = work / f"ray{workers}"
            report = build_map(bundle, db, out, runner, build, shards)
            rates[f"ray_{workers}_workers"] = report.images_per_second
        finally:
            ray.shutdown()
        shutil.rmtree(out)
    for name, rate in rates.items():
        print(f"build {name:16s}: {rate:6.2f} img/s ({rate / rates['in_process']:.2f}x)")
    return rates


def fan_out(
    bundle: Bundle,
    map_dir: Path,
    queries: list[Path],
    rerank_k: int,
    query_tokens: int,
    rounds: int,
) -> dict[str, float]:
    """Median ms per query of the search and of the re-rank scoring: in-process, through the
    compiled graph, and by one actor call per shard. For the Ray sides also the transport:
    the stage's wall time less the busiest shard's own time on it (`RayShardSet.last_fan_out`).

    Queries keep their first `query_tokens` tokens, so that the scoring itself is cheap and
    its fan-out cost shows; a pause between calls lets one side's idle BLAS threads stop
    spinning before the other side is timed (2 cores)."""
    import ray

    rerank = RerankSettings(backend=RerankBackend.CPU)
    with open_encoder(bundle) as encoder:  # type: ignore[attr-defined]
        encoded = []
        for q in queries:
            out = encoder.encode(preprocess(q, bundle.resolution)[None])
            encoded.append((out.descriptors, [t[:query_tokens] for t in out.token_list()]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    times: dict[str, list[float]] = {}
    try:
        openers = {
            "local": lambda: open_shard_set(map_dir, bundle),
            "ray": lambda: open_shard_set(map_dir, bundle, ray="auto"),
            "ray_calls": lambda: open_shard_set(map_dir, bundle, ray="auto", compiled=False),
        }
        served: dict[str, ShardSet] = {}
        for name, opener in openers.items():
            start = time.perf_counter()
            served[name] = opener()
            times[f"{name}_open_s"] = [time.perf_counter() - start]
        for shard_set in served.values():  # warm-up: page cache, actor start, first calls
            _one_query(shard_set, *encoded[0], rerank_k, rerank)
        for descriptors, tokens in encoded * rounds:
            for name, shard_set in served.items():
                time.sleep(0.2)
                measured = _one_query(shard_set, descriptors, tokens, rerank_k, rerank)
                for key, ms in measured.items():
                    times.setdefault(f"{name}_{key}", []).append(ms)
        for shard_set in served.values():
            shard_set.close()
    finally:
        ray.shutdown()
    result = {k: statistics.median(v) for k, v in times.items()}
    for name in ("ray", "ray_calls"):
        for stage in ("search", "score"):
            result[f"{name}_{stage}_overhead_ms"] = (
                result[f"{name}_{stage}_ms"] - result[f"local_{stage}_ms"]
            )
        result[f"{name}_overhead_ms"] = (
            result[f"{name}_search_overhead_ms"] + result[f"{name}_score_overhead_ms"]
        )
        result[f"{name}_transport_ms"] = statistics.median(
            a + b
            for a, b in zip(
                times[f"{name}_search_transport_ms"], times[f"{name}_score_transport_ms"]
            )
        )
    for k, v in result.items():
        print(f"{k:32s} {v:8.2f}")
    return result


def _one_query(
    shard_set: ShardSet,
    descriptors: np.ndarray,
    tokens: list[np.ndarray],
    rerank_k: int,
    rerank: RerankSettings,
) -> dict[str, float]:
    """ms of each stage, and for a Ray shard set each stage's transport."""
    measured: dict[str, float] = {}
    start = time.perf_counter()
    _, ids, _ = shard_set.search(descriptors, rerank_k)
    measured["search_ms"] = (time.perf_counter() - start) * 1e3
    last = getattr(shard_set, "last_fan_out", None)
    if last is not None:
        measured["search_transport_ms"] = (last.wall_s - last.busiest_shard_s) * 1e3
    start = time.perf_counter()
    shard_set.score(tokens, [ids[0][ids[0] >= 0]], rerank, Timer())
    measured["score_ms"] = (time.perf_counter() - start) * 1e3
    last = getattr(shard_set, "last_fan_out", None)
    if last is not None:
        measured["score_transport_ms"] = (last.wall_s - last.busiest_shard_s) * 1e3
    return measured


def options() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("--arch", default="vits14")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--places", type=int, default=24)
    p.add_argument("--distractors", type=int, default=24)
    p.add_argument("--shards", default="4,8", help="shards of the served maps")
    p.add_argument("--build-shards", type=int, default=8, help="shards of the build runs")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--queries", type=int, default=20)
    p.add_argument("--rerank-k", type=int, default=10)
    p.add_argument("--query-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="times each query is timed")
    p.add_argument("--no-build", action="store_true", help="query side only")
    return p


def main() -> None:
    args = options().parse_args()

    report: dict[str, object] = {"settings": settings(args)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle, db, queries = untrained_setup(
            work, args.arch, args.resolution, args.places, args.distractors, args.queries
        )
        report["images"] = len(list(db.rglob("*.jpg")))
        if not args.no_build:
            report["build"] = build_rates(bundle, db, work, args.build_shards, args.batch)
        report["query"] = {}
        for shards in map(int, args.shards.split(",")):
            served = work / f"served-{shards}"
            with open_encoder(bundle) as encoder:  # type: ignore[attr-defined]
                build = BuildSettings(batch=args.batch)
                build_map(bundle, db, served, LocalRunner(encoder), build, shards)
            print(f"fan-out over {shards} shards:")
            report["query"][f"{shards}_shards"] = fan_out(  # type: ignore[index]
                bundle, served, queries, args.rerank_k, args.query_tokens, args.rounds
            )
    write_report(args.json, report)


if __name__ == "__main__":
    main()
