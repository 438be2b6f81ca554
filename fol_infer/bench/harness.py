"""One benchmark run: index a dataset's database, query it at batch 1, measure everything.

Latency per stage comes from the pipeline's own timers (the code users run), recall from the
dataset's UTM ground truth, parity from the PyTorch reference on the same images. The report
dict is filled as the run goes, so an interrupted run still shows what it measured.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fol_infer.backends.base import Encoder
from fol_infer.bench import environment
from fol_infer.bench.dataset import Dataset, open_dataset
from fol_infer.bench.recall import RECALL_NS, recall_at
from fol_infer.bundle import Bundle
from fol_infer.choices import EncoderBackend, TokenFormat
from fol_infer.errors import UsageError
from fol_infer.images import DEFAULT_RESOLUTION
from fol_infer.model.arch import MAX_TOKENS, TOKEN_DIM
from fol_infer.pipeline import STAGES, QueryResult, Retriever
from fol_infer.positions import RADIUS_M, check_radius, read_positions_csv
from fol_infer.progress import Progress
from fol_infer.rerank.settings import RerankSettings

SCHEMA_VERSION = 1
RERANK_DEPTHS = (1, 5, 10, 25, 50, 100)
PUBLISHED_BYTES_PER_IMAGE = MAX_TOKENS * TOKEN_DIM * 4  # zero-padded float32


@dataclass(kw_only=True)
class BenchOptions:
    backend: EncoderBackend = EncoderBackend.ONNX
    bundle: Path | None = None
    checkpoint: Path | None = None
    dataset: Path | None = None
    resolution: str = str(DEFAULT_RESOLUTION)
    rerank_k: int = 100
    batch: int = 8
    warmup: int = 2
    rerank: RerankSettings = field(default_factory=RerankSettings)
    tokens: TokenFormat = TokenFormat.FP16
    positions: Path | None = None  # a CSV of positions (else the file names' UTM)
    positive_radius: float = RADIUS_M


def percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, np.float64)
    return {
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()),
    }


def _recall_block(
    rankings: np.ndarray, positives: list[np.ndarray] | None, n_db: int
) -> dict[str, float | None] | None:
    if positives is None:
        return None
    raw = recall_at(rankings, positives, RECALL_NS, num_database=n_db)
    return {key.removeprefix("R@"): value for key, value in raw.items()}


def _reranked_at_depth(result: QueryResult, depth: int) -> list[int]:
    """The final ranking had only the global top-`depth` been re-ranked."""
    matches = {h.db_index: h.matches for h in result.reranked or []}
    globals_ = [h.db_index for h in result.global_hits]
    head = sorted(globals_[:depth], key=lambda i: -matches.get(i, 0))  # stable: global order
    return head + globals_[depth:]


class Bench:
    def __init__(self, options: BenchOptions, say: Progress) -> None:
        self.options = options
        self.say = say
        self.report: dict[str, Any] = {
            "schema": "fol-infer-bench",
            "schema_version": SCHEMA_VERSION,
            "partial": True,
            "notes": [],
        }

    # ------------------------------------------------------------------ inputs
    def _inputs(self) -> tuple[Bundle, Dataset]:
        from fol_infer.bench import defaults

        opts, notes = self.options, self.report["notes"]
        check_radius(opts.positive_radius)  # before any work, as a bad CSV
        table = read_positions_csv(opts.positions) if opts.positions else None
        if opts.bundle is not None:
            bundle_dir = opts.bundle
        else:
            checkpoint = opts.checkpoint or defaults.default_checkpoint(self.say)
            bundle_dir = defaults.bundle_for(checkpoint, opts.resolution, self.say)
        bundle = Bundle.open(bundle_dir)
        if not bundle.manifest.trained:
            notes.append(
                "UNTRAINED seeded checkpoint: latencies are real, "
                "recall says nothing about FoL's accuracy"
            )
        dataset = open_dataset(opts.dataset or defaults.default_dataset(self.say), table)
        unmatched = table and table.unmatched_note([*dataset.database, *dataset.queries])
        if unmatched:
            notes.append(unmatched)
            self.say(f"note: {unmatched}")
        if dataset.synthetic:
            notes.append(
                "synthetic dataset (fol-infer make-dataset): it exercises the pipeline only"
            )
        if dataset.positions_unavailable:
            notes.append(f"recall unavailable: {dataset.positions_unavailable}")
        n_db = len(dataset.database)
        if opts.rerank_k > n_db:
            notes.append(
                f"--rerank-k {opts.rerank_k} > database size {n_db}: re-ranking all {n_db}"
            )
        self.report["inputs"] = {
            "engine": str(opts.backend),
            "bundle": str(bundle.folder),
            "arch": bundle.manifest.arch_name,
            "resolution": list(bundle.resolution),
            "trained": bundle.manifest.trained,
            "precision": environment.engine_precision(bundle, opts.backend),
            "dataset": str(dataset.layout.root),
            "synthetic_dataset": dataset.synthetic,
            "database_images": n_db,
            "query_images": len(dataset.queries),
            "rerank_k": min(opts.rerank_k, n_db),
            "batch": opts.batch,
            "warmup": opts.warmup,
            "reranker": str(opts.rerank.backend),
            "threshold": opts.rerank.threshold,
            "tokens": str(opts.tokens),
            "positions": str(opts.positions) if opts.positions else "file names",
            "positive_radius_m": opts.positive_radius,
        }
        return bundle, dataset

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        self.report["environment"] = environment.describe(self.options.backend)
        bundle, dataset = self._inputs()
        from fol_infer.backends import open_encoder

        torch = self.options.backend == EncoderBackend.TORCH  # else it is the reference's only
        checkpoint = self.options.checkpoint if torch else None
        encoder = open_encoder(bundle, self.options.backend, checkpoint=checkpoint)
        try:  # one encoder for the database and the queries
            with tempfile.TemporaryDirectory(prefix="fol-bench-") as tmp:
                index_dir = Path(tmp) / "index"
                self._build(bundle, encoder, dataset, index_dir)
                results = self._queries(bundle, encoder, dataset, index_dir)
        finally:
            encoder.close()
        self._recall(dataset, results)
        if self.options.backend != EncoderBackend.TORCH:
            self._parity(bundle, dataset, results)
        self._memory()
        self.report["partial"] = False
        return self.report

    def _build(self, bundle: Bundle, encoder: Encoder, dataset: Dataset, index_dir: Path) -> None:
        from fol_infer.index.build import BuildSettings, build_index
        from fol_infer.index.database import Database

        self.say(f"indexing {len(dataset.database)} database images with {self.options.backend}")
        report = build_index(
            bundle,
            encoder,
            dataset.layout.database_dir,
            index_dir,
            BuildSettings(batch=self.options.batch, tokens=self.options.tokens),
        )
        with Database(index_dir) as database:
            store_bytes = database.tokens.bytes_per_image
            if database.exact_tokens is not None:  # int8-exact keeps float32 on disk too
                store_bytes += database.exact_tokens.bytes_per_image
        self.report["throughput"] = {
            "database_images_per_s": report.images_per_second,
            "batch": self.options.batch,
            "failed_images": len(report.failures),
        }
        self.report["memory"] = {
            "token_store_bytes_per_image": store_bytes,
            "published_bytes_per_image": PUBLISHED_BYTES_PER_IMAGE,
        }

    def _queries(
        self, bundle: Bundle, encoder: Encoder, dataset: Dataset, index_dir: Path
    ) -> list[QueryResult]:
        opts = self.options
        n_db = len(dataset.database)
        depth = min(max(max(RECALL_NS), opts.rerank_k), n_db)
        stages: dict[str, list[float]] = {name: [] for name in (*STAGES, "total", "unattributed")}
        results: list[QueryResult] = []
        self.report["latency_ms"] = {}
        with Retriever(bundle, index_dir, rerank=opts.rerank, encoder=encoder) as retriever:
            for query in dataset.queries[: opts.warmup]:
                retriever.query([query], top_k=depth, rerank_k=min(opts.rerank_k, n_db))
            self.say(f"querying {len(dataset.queries)} images at batch 1 ({opts.warmup} warm-up)")
            for query in dataset.queries:
                start = time.perf_counter()
                (result,) = retriever.query([query], top_k=depth, rerank_k=min(opts.rerank_k, n_db))
                total = (time.perf_counter() - start) * 1e3
                results.append(result)
                for name in STAGES:
                    stages[name].append(result.timings_ms[name])
                stages["total"].append(total)
                stages["unattributed"].append(total - sum(result.timings_ms.values()))
                self.report["latency_ms"] = {k: percentiles(v) for k, v in stages.items()}
        share = sum(stages["unattributed"]) / sum(stages["total"])
        self.report["overhead"] = {"unattributed_share": share}
        return results

    def _recall(self, dataset: Dataset, results: list[QueryResult]) -> None:
        positives = dataset.positives(self.options.positive_radius)
        n_db = len(dataset.database)
        global_rank = np.array([[h.db_index for h in r.global_hits] for r in results])
        reranked = np.array([r.ranking() for r in results])
        self.report["recall"] = {
            "global": _recall_block(global_rank, positives, n_db),
            "reranked": _recall_block(reranked, positives, n_db),
            "unavailable": dataset.positions_unavailable,
        }
        deepest = self.report["inputs"]["rerank_k"]
        depths = sorted({k for k in RERANK_DEPTHS if k <= deepest} | {deepest})
        curve: dict[str, list[float | None]] = {"K": list(depths), "1": [], "5": []}
        if positives is not None:
            for k in depths:
                ranks = np.array([_reranked_at_depth(r, k) for r in results])
                block = _recall_block(ranks, positives, n_db) or {}
                curve["1"].append(block.get("1"))
                curve["5"].append(block.get("5"))
        self.report["recall_vs_rerank_k"] = curve

    def _parity(self, bundle: Bundle, dataset: Dataset, results: list[QueryResult]) -> None:
        from fol_infer.bench.parity_run import torch_parity

        self.say("running the PyTorch reference on the same images for parity")
        try:
            self.report["parity"] = torch_parity(
                bundle,
                dataset,
                results,
                self.options.checkpoint,
                self.options.rerank,
                self.report["inputs"]["rerank_k"],
            )
        except UsageError as exc:  # no torch, or the checkpoint is not where the manifest says
            self.report["parity"] = {"unavailable": str(exc)}

    def _memory(self) -> None:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        self.report["memory"]["peak_rss_mib"] = peak / 2**20
        self.report["memory"]["gpu_peak_mib"] = environment.gpu_peak_mib()
