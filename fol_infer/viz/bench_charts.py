"""Benchmark charts: p50 latency per query stage and recall vs re-rank depth, one or more
reports (`fol-infer bench --json`) side by side."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from fol_infer.errors import UsageError
from fol_infer.viz.figure import new_figure, save, untrained_caption

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STAGE_ORDER = ("preprocess", "global", "search", "local", "fetch", "rerank", "unattributed")


@dataclass(frozen=True)
class ReportSeries:
    """What the chart plots of one report."""

    label: str
    stages_ms: dict[str, float]  # p50 per stage, in STAGE_ORDER, present stages only
    depths: list[int]  # re-rank depths K
    recall: dict[str, list[float | None]]  # "1" / "5" -> re-ranked R@N per depth
    trained: bool
    machine: str


def load_report(path: Path) -> dict[str, Any]:
    """A bench report from its JSON file, every field the chart reads checked: a clear error
    naming the file and the field (``r.json: latency_ms.global.p50 is missing``)."""
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: no such report") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path} is not a readable JSON report ({exc})") from None
    if not isinstance(report, dict) or report.get("schema") != "fol-infer-bench":
        raise UsageError(f"{path} is not a fol-infer bench report (fol-infer bench --json)")
    _check_fields(report, path)
    return report


def _check_fields(report: dict[str, Any], path: Path) -> None:
    """Refuse a truncated or edited report before it is drawn (see `chart_series`)."""

    def fail(field: str, why: str) -> NoReturn:
        raise UsageError(f"{path}: {field} {why} (write it again with fol-infer bench --json)")

    def section(name: str) -> dict[str, Any]:
        value = report.get(name, {})
        if not isinstance(value, dict):
            fail(name, "is not an object")
        return value

    def number(value: Any, field: str, lo: float, hi: float = math.inf) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(field, "is not a number")
        if not (math.isfinite(value) and lo <= value <= hi):
            fail(field, f"is {value}, not a number in [{lo:g}, {hi:g}]")

    latency = section("latency_ms")
    for stage in (s for s in STAGE_ORDER if s in latency):
        if not isinstance(latency[stage], dict) or "p50" not in latency[stage]:
            fail(f"latency_ms.{stage}.p50", "is missing")
        number(latency[stage]["p50"], f"latency_ms.{stage}.p50", 0.0)
    curve = section("recall_vs_rerank_k")
    depths = curve.get("K", [])
    if not isinstance(depths, list):
        fail("recall_vs_rerank_k.K", "is not a list")
    for i, k in enumerate(depths):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            fail(f"recall_vs_rerank_k.K[{i}]", f"is {k!r}, not a depth (an integer >= 1)")
    for n in ("1", "5"):
        values = curve.get(n, [])
        if not isinstance(values, list) or len(values) != len(depths):
            fail(f"recall_vs_rerank_k.{n}", f"is not a list of {len(depths)} recalls (one per K)")
        for i, value in enumerate(values):
            if value is not None:
                number(value, f"recall_vs_rerank_k.{n}[{i}]", 0.0, 100.0)
    inputs, environment = section("inputs"), section("environment")
    if not isinstance(inputs.get("trained", True), bool):
        fail("inputs.trained", "is not true or false")
    for where, key in (("inputs", "engine"), ("inputs", "tokens"), ("environment", "cpu")):
        if not isinstance(section(where).get(key, ""), str):
            fail(f"{where}.{key}", "is not a string")
    if not isinstance(environment.get("gpu"), (str, type(None))):
        fail("environment.gpu", "is not a string or null")


def chart_series(reports: Sequence[dict[str, Any]], names: Sequence[str]) -> list[ReportSeries]:
    """One series per report, labelled by engine and token format (and ``names`` where two
    reports would read the same)."""
    labels = [_label(r) for r in reports]
    series = []
    for report, label, name in zip(reports, labels, names, strict=True):
        latency = report.get("latency_ms", {})
        curve = report.get("recall_vs_rerank_k", {})
        env = report.get("environment", {})
        series.append(
            ReportSeries(
                label=f"{label} [{name}]" if labels.count(label) > 1 else label,
                stages_ms={s: float(latency[s]["p50"]) for s in STAGE_ORDER if s in latency},
                depths=[int(k) for k in curve.get("K", [])],
                recall={n: list(curve.get(n, [])) for n in ("1", "5")},
                trained=bool(report.get("inputs", {}).get("trained", True)),
                machine=f"{env.get('cpu', '?')}, GPU: {env.get('gpu') or 'none'}",
            )
        )
    return series


def _label(report: dict[str, Any]) -> str:
    inputs = report.get("inputs", {})
    return f"{inputs.get('engine', '?')}, {inputs.get('tokens', 'fp16')} tokens"


def draw_bench(series: Sequence[ReportSeries], out: Path) -> None:
    """`bench_figure`, written to `out`."""
    save(bench_figure(series), out)


def bench_figure(series: Sequence[ReportSeries]) -> Figure:
    """Left: stacked p50 stage latency, one bar per report; right: re-ranked recall vs K."""
    figure = new_figure(figsize=(12, max(3.4, 1.6 + 0.8 * len(series))))
    from matplotlib import colormaps

    left, right = figure.subplots(1, 2, width_ratios=(3, 2))
    colours = colormaps["tab10"]
    labels = [s.label for s in series]
    for i, stage in enumerate(STAGE_ORDER):
        widths = [s.stages_ms.get(stage, 0.0) for s in series]
        starts = [sum(s.stages_ms.get(p, 0.0) for p in STAGE_ORDER[:i]) for s in series]
        left.barh(labels, widths, left=starts, height=0.6, color=colours(i), label=stage)
    for y, s in enumerate(series):
        left.text(sum(s.stages_ms.values()), y, f" {sum(s.stages_ms.values()):,.0f} ms",
                  va="center", fontsize=8)  # fmt: skip
    left.set_ylim(len(series) - 0.5, -0.5)  # the first report on top
    left.set_xlabel("p50 latency per query (ms, batch 1)")
    left.legend(fontsize=7, ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    left.margins(x=0.15)
    drawn = False
    markers, series_colours = "os^vDP", colormaps["Dark2"]
    for i, s in enumerate(series):  # later series drawn smaller: identical curves stay visible
        for n, style in (("1", "-"), ("5", "--")):
            points = [(k, v) for k, v in zip(s.depths, s.recall.get(n, [])) if v is not None]
            if points:
                drawn = True
                right.plot(
                    *zip(*points), style, marker=markers[i % 6], ms=9 - 2 * (i % 3),
                    color=series_colours(i), alpha=0.85, label=f"R@{n} {s.label}",
                )  # fmt: skip
    if drawn:
        depths = sorted({k for s in series for k in s.depths})
        right.set_xscale("log")
        right.set_xticks(depths, [str(k) for k in depths])
        right.minorticks_off()
        right.legend(fontsize=7)
    else:
        right.text(0.5, 0.5, "recall unavailable\n(no positions)", ha="center", va="center",
                   transform=right.transAxes)  # fmt: skip
    right.set_ylim(0, 105)
    right.set_xlabel("re-rank depth K")
    right.set_ylabel("re-ranked recall (%)")
    machines = sorted({s.machine for s in series})
    figure.suptitle("fol-infer bench: " + "; ".join(machines), fontsize=10)
    untrained_caption(figure, all(s.trained for s in series))
    return figure
