"""Commands from checkpoint to verified bundle: make-checkpoint, export, verify, info."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fol_infer.bundle import Bundle
from fol_infer.choices import EncoderBackend, Precision, RerankBackend
from fol_infer.cli.app import app, console, friendly_errors, status, stdout, untrained_banner
from fol_infer.cli.options import BackendOption, CheckpointOption, choice, refuse_unused
from fol_infer.errors import UsageError
from fol_infer.files.ownership import check_outputs
from fol_infer.images import DEFAULT_RESOLUTION


@app.command("make-checkpoint")
@friendly_errors
def make_checkpoint(
    out: Annotated[Path, typer.Argument(help="Where to write the .pth file.")],
    arch: Annotated[str, typer.Option(help="vits14, vitb14, vitl14, vitg14 or tiny.")] = "vitb14",
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same weights.")] = 0,
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a seeded random checkpoint in the published layout, marked UNTRAINED."""
    from fol_infer.model.arch import get_arch
    from fol_infer.model.checkpoint import make_checkpoint as make

    get_arch(arch)
    check_outputs({"OUT": out})
    if out.exists() and not force:
        raise UsageError(f"{out} already exists: pass --force to overwrite it")
    make(arch, seed, out)
    untrained_banner(False)
    console.print(f"wrote {out} ({arch}, seed {seed}, {out.stat().st_size / 2**20:.1f} MiB)")


@app.command()
@friendly_errors
def export(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Argument(help="FoL checkpoint (.pth).")],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Bundle folder (default: engines/<arch>-<res>)."),
    ] = None,
    resolution: Annotated[
        str, typer.Option(help="Input size: N or HxW, multiples of 14, >= 210.")
    ] = str(DEFAULT_RESOLUTION),
    opset: Annotated[int, typer.Option(min=17, help="ONNX opset (>= 17).")] = 18,
    force: Annotated[
        bool,
        typer.Option(
            help="Replace an existing bundle (only a fol-infer bundle or an empty folder, "
            "never one holding the checkpoint)."
        ),
    ] = False,
    trust_checkpoint: Annotated[
        bool,
        typer.Option(help="Allow full unpickling of the checkpoint (runs code it holds)."),
    ] = False,
    trt: Annotated[
        bool, typer.Option("--trt", help="Also build TensorRT engines here (needs a GPU).")
    ] = False,
    precision: Annotated[
        Precision, choice(Precision, "With --trt: engine precision.", "--precision")
    ] = Precision.FP16,
    max_batch: Annotated[
        int, typer.Option(min=1, help="With --trt: largest batch of the profile.")
    ] = 32,
) -> None:
    """Export a checkpoint to a bundle: global.onnx, local.onnx, reference.npz, manifest."""
    import time

    if not trt:
        why = "applies to the TensorRT engines: add --trt, or drop it"
        refuse_unused(ctx, {"precision": why, "max_batch": why})
    from fol_infer.export.onnx import export_bundle
    from fol_infer.export.opcheck import check_bundle

    start = time.perf_counter()
    with status("exporting") as say:
        bundle = export_bundle(
            checkpoint, out, resolution, opset, force, trust_checkpoint, progress=say
        )
    reports = check_bundle(bundle)
    console.print(f"wrote {bundle} in {time.perf_counter() - start:.0f} s")
    for report in reports:
        verdict = (
            "TensorRT-ready" if report.ok else "NOT TensorRT-ready: " + "; ".join(report.problems)
        )
        console.print(f"  {report.path.name}: {sum(report.op_counts.values())} nodes, {verdict}")
    if trt:
        from fol_infer.cli.trt_command import build_and_report
        from fol_infer.export.bundle_engines import EngineSettings

        build_and_report(bundle, EngineSettings(precision, max_batch))


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


@app.command()
@friendly_errors
def info(
    path: Annotated[Path, typer.Argument(help="A bundle folder or a checkpoint file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Say what a bundle or checkpoint is: architecture, resolution, sizes, checksums."""
    if path.is_dir():
        bundle = Bundle.open(path, verify="sizes")
        data = bundle.manifest.to_dict()
    else:
        from fol_infer.model.checkpoint import describe_checkpoint

        data = describe_checkpoint(path)
    if as_json:
        print(json.dumps(data, indent=2))
        return
    untrained_banner(bool(data.get("trained", True)))
    table = Table(show_header=False, title=str(path))
    for key, value in data.items():
        if isinstance(value, dict):
            value = (
                json.dumps(value, indent=1) if len(json.dumps(value)) > 60 else json.dumps(value)
            )
        table.add_row(key, str(value))
    stdout.print(table)
