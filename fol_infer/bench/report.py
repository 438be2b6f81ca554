"""Render a benchmark report: JSON (the schema below), a Markdown summary, a chart.

JSON schema, version 1 (keys always present unless marked optional):
- schema "fol-infer-bench", schema_version 1, partial (true if interrupted), notes [str]
- environment: fol_infer, python, platform, cpu, cpu_count, gpu (str|null), engine, libraries
- inputs: engine, bundle, arch, resolution [h, w], trained, precision, dataset,
  synthetic_dataset, database_images, query_images, rerank_k, batch, warmup, reranker,
  threshold (the re-ranking threshold), tokens (the index's token format)
- latency_ms: {stage: {p50, p90, p99, mean}} for preprocess, global, search, local, fetch,
  rerank, total and unattributed (total minus the stages: pipeline and bench bookkeeping)
- throughput: database_images_per_s, batch, failed_images
- recall: global {"1", "5", "10", "25", "100": percent|null}, reranked {same},
  unavailable (str|null)
- recall_vs_rerank_k: K [depths], "1" [R@1 per depth], "5" [R@5 per depth]
- parity (optional, engines other than torch): images_compared, min_global_cosine,
  mean_global_cosine, top1_agreement_global, top1_agreement_reranked, recall_delta_global,
  recall_delta_reranked — or {"unavailable": reason}
- memory: token_store_bytes_per_image, published_bytes_per_image, peak_rss_mib, gpu_peak_mib
- overhead: unattributed_share (fraction of the total)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fol_infer.files.atomic import Writer
from fol_infer.viz.bench_charts import STAGE_ORDER, bench_figure, chart_series
from fol_infer.viz.figure import writer


def json_bytes(report: dict[str, Any]) -> bytes:
    """The report as the JSON file ``bench --json`` writes (schema above)."""
    return (json.dumps(report, indent=2) + "\n").encode()


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    inp, env = report.get("inputs", {}), report.get("environment", {})
    lines = [f"# fol-infer bench — {inp.get('engine', '?')} engine", ""]
    lines += [f"> {note}" for note in report.get("notes", [])]
    if report.get("partial"):
        lines.append("> PARTIAL: the run was interrupted; only what was measured is shown")
    resolution = "x".join(map(str, inp.get("resolution", [])))
    trained = "trained" if inp.get("trained") else "UNTRAINED"
    source = "synthetic" if inp.get("synthetic_dataset") else inp.get("dataset", "?")
    libraries = ", ".join(f"{k} {v}" for k, v in env.get("libraries", {}).items())
    lines += [
        "",
        f"- machine: {env.get('cpu', '?')} ({env.get('cpu_count', '?')} cores), "
        f"GPU: {env.get('gpu') or 'none'}",
        f"- model: {inp.get('arch', '?')} at {resolution}, {trained}, "
        f"precision {inp.get('precision', '?')}",
        f"- dataset: {inp.get('database_images', '?')} database / "
        f"{inp.get('query_images', '?')} queries ({source}), "
        f"re-rank K = {inp.get('rerank_k', '?')} with {inp.get('reranker', '?')} at threshold "
        f"{inp.get('threshold', '?')}",
        f"- libraries: {libraries}",
        "",
    ]
    latency = report.get("latency_ms", {})
    if latency:
        lines += ["| stage (batch 1) | p50 ms | p90 ms | p99 ms |", "|---|---:|---:|---:|"]
        for stage in (*STAGE_ORDER, "total"):
            if stage in latency:
                s = latency[stage]
                lines.append(f"| {stage} | {s['p50']:.1f} | {s['p90']:.1f} | {s['p99']:.1f} |")
        lines.append("")
    if "throughput" in report:
        t = report["throughput"]
        lines += [
            f"Database encoding: {t['database_images_per_s']:.2f} images/s at batch {t['batch']}.",
            "",
        ]
    recall = report.get("recall")
    if recall:
        if recall.get("unavailable"):
            lines += [f"Recall unavailable: {recall['unavailable']}", ""]
        else:
            ns = list(recall["global"])
            lines += [
                "| recall | " + " | ".join(f"R@{n}" for n in ns) + " |",
                "|---|" + "---:|" * len(ns),
            ]
            for name in ("global", "reranked"):
                lines.append(f"| {name} | " + " | ".join(_fmt(recall[name][n]) for n in ns) + " |")
            lines.append("")
    parity = report.get("parity")
    if parity:
        if "unavailable" in parity:
            lines += [f"Parity unavailable: {parity['unavailable']}", ""]
        else:
            lines += [
                f"Parity vs PyTorch on {parity['images_compared']} queries: global cosine "
                f"min {parity['min_global_cosine']:.6f} / mean {parity['mean_global_cosine']:.6f}; "
                f"top-1 agreement {parity['top1_agreement_global']:.0%} global, "
                f"{parity['top1_agreement_reranked']:.0%} re-ranked; recall delta (re-ranked) "
                f"{parity.get('recall_delta_reranked', 'n/a')}.",
                "",
            ]
    memory = report.get("memory", {})
    if memory:
        per_image = memory.get("token_store_bytes_per_image", 0.0)
        gpu_mib = memory.get("gpu_peak_mib")
        gpu = "n/a" if gpu_mib is None else f"{gpu_mib:.0f} MiB"
        lines += [
            f"Memory: peak RSS {_fmt(memory.get('peak_rss_mib'), 0)} MiB, "
            f"GPU peak {gpu}; "
            f"token store ({report.get('inputs', {}).get('tokens', 'fp16')}) "
            f"{per_image / 2**20:.3f} MiB per image "
            f"({per_image / memory.get('published_bytes_per_image', 1):.2f}x "
            "the published 1.76 MiB).",
        ]
    if "overhead" in report:
        lines.append(
            "Unattributed time (bookkeeping between stages): "
            f"{report['overhead']['unattributed_share']:.2%} of the total."
        )
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path) -> Writer:
    """What writes the chart of p50 latency per stage and recall vs re-rank depth
    (`fol_infer.viz.bench_charts`) to `path`'s format."""
    return writer(bench_figure(chart_series([report], [path.stem])), path)
