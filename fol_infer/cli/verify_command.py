"""`fol-infer verify`: a bundle's engines against its reference outputs (exit 1 beyond
tolerance)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fol_infer.bundle import Bundle
from fol_infer.choices import EncoderBackend, Precision, RerankBackend
from fol_infer.cli.app import app, console, friendly_errors, stdout, untrained_banner
from fol_infer.cli.options import BackendOption, CheckpointOption, choice


@app.command()
@friendly_errors
def verify(
    bundle_dir: Annotated[Path, typer.Argument(help="Bundle folder.")],
    backend: BackendOption = EncoderBackend.ONNX,
    checkpoint: CheckpointOption = None,
    precision: Annotated[
        Precision | None,
        choice(Precision, "Tolerances (default: the engine's precision).", "--precision"),
    ] = None,
) -> None:
    """Re-run reference.npz through a backend; compare with PyTorch, and the re-rank graph (the
    trt backend: the rerank engine) with the CPU re-ranker's counts (exit 1 on failure)."""
    from fol_infer.backends import open_encoder
    from fol_infer.parity import TOLERANCES
    from fol_infer.parity import verify as run_verify

    bundle = Bundle.open(bundle_dir, verify="full")
    untrained_banner(bundle.manifest.trained)
    encoder = open_encoder(bundle, backend, checkpoint=checkpoint)
    precision = precision or encoder.precision
    try:
        report = run_verify(bundle, encoder, precision)
    finally:
        encoder.close()
    tol = TOLERANCES[precision]
    table = Table(title=f"{bundle_dir} — {backend} vs PyTorch reference ({report.images} images)")
    table.add_column("check")
    table.add_column("value", justify="right")
    table.add_column("tolerance", justify="right")
    table.add_row(
        "min global cosine", f"{report.min_global_cosine:.7f}", f">= {tol['global_cosine']}"
    )
    table.add_row("max token |diff|", f"{report.max_token_diff:.2e}", f"<= {tol['token_diff']:.0e}")
    table.add_row(
        "count agreement", f"{report.count_agreement:.0%}", "100%" if precision == "fp32" else "-"
    )
    table.add_row("region agreement", f"{report.position_agreement:.0%}", "-")
    table.add_row(
        "  on images without a tie at the 225th place",
        f"{report.untied_position_agreement:.0%} ({report.boundary_ties} tied)",
        f">= {tol['positions']:.0%}",
    )
    failures = list(report.failures)
    rerank = _rerank_row(bundle, backend, table)
    if rerank:
        failures.append(rerank)
    stdout.print(table)
    if failures:
        console.print("[red]FAILED[/red]: " + "; ".join(failures))
        raise typer.Exit(1)
    console.print("[green]passed[/green]")


def _rerank_row(bundle: Bundle, backend: EncoderBackend, table: Table) -> str:
    """Check the bundle's re-ranker graph (or engine) and add its row; the failure, or ""."""
    from fol_infer.rerank.graph_check import check_rerank

    if bundle.manifest.rerank is None:
        console.print(
            "[yellow]note:[/yellow] no rerank.onnx (exported before the re-rank graph existed): "
            "re-export to re-rank with the onnx or trt re-rankers"
        )
        return ""
    graph = RerankBackend.TRT if backend == EncoderBackend.TRT else RerankBackend.ONNX
    check = check_rerank(bundle, graph)
    table.add_row(f"{check.runner}: equal counts", f"{check.equal}/{check.pairs}", "all")
    return "" if check.passed else f"re-rank counts differ ({check.first_difference})"
