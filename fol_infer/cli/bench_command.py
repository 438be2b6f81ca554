"""`fol-infer bench`: latency per stage, Recall@N before/after re-ranking, parity."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, cast

import typer

from fol_infer.cli.app import app, console, friendly_errors, stdout
from fol_infer.cli.model_commands import PositionsOption, RadiusOption
from fol_infer.errors import UsageError
from fol_infer.positions import RADIUS_M

ENGINES = ("onnx", "torch", "trt")


@app.command()
@friendly_errors
def bench(
    engine: Annotated[str, typer.Option(help="Engine to measure: onnx, torch or trt.")] = "onnx",
    bundle: Annotated[
        Path | None, typer.Option(help="Bundle folder (else exported from --checkpoint).")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Checkpoint [an UNTRAINED seeded ViT-B/14].")
    ] = None,
    dataset: Annotated[
        Path | None, typer.Option(help="Dataset root in the standard layout [synthetic].")
    ] = None,
    resolution: Annotated[
        str, typer.Option(help="Resolution when exporting from a checkpoint.")
    ] = "322",
    rerank_k: Annotated[int, typer.Option(help="Global candidates re-ranked per query.")] = 100,
    batch: Annotated[int, typer.Option(help="Batch size for database encoding.")] = 8,
    warmup: Annotated[int, typer.Option(help="Warm-up queries before timing.")] = 2,
    reranker: Annotated[str, typer.Option(help="Re-ranker: auto, cpu, triton or torch.")] = "auto",
    tokens: Annotated[
        str, typer.Option(help="Token format of the index: fp16, int8 or int8-exact.")
    ] = "fp16",
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the JSON report here.")
    ] = None,
    markdown_out: Annotated[
        Path | None, typer.Option("--markdown", help="Write a Markdown summary here.")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Write a chart here (.png or .svg; the viz extra).")
    ] = None,
    positions: PositionsOption = None,
    positive_radius: RadiusOption = RADIUS_M,
) -> None:
    """Benchmark an engine end to end; with no arguments, on an embedded UNTRAINED default."""
    from fol_infer.bench.harness import Bench, BenchOptions
    from fol_infer.bench.report import chart, markdown, write_json
    from fol_infer.index.database import TOKEN_FORMATS, TokenFormat

    if plot is not None:
        from fol_infer.viz.figure import check_out

        check_out(plot)  # before the run, not after it
    if engine not in ENGINES:
        raise UsageError(f"--engine must be one of {', '.join(ENGINES)}")
    if bundle is not None and checkpoint is not None and engine != "torch":
        console.print("note: --bundle given; --checkpoint is used only for the PyTorch reference")
    if rerank_k < 1 or batch < 1 or warmup < 0:
        raise UsageError("--rerank-k and --batch must be >= 1, --warmup >= 0")
    if tokens not in TOKEN_FORMATS:
        raise UsageError(f"--tokens must be one of {', '.join(TOKEN_FORMATS)}, not {tokens!r}")
    if tokens == "int8-exact" and reranker not in ("auto", "cpu"):
        raise UsageError("--tokens int8-exact is re-ranked on the CPU: use --reranker auto or cpu")
    if bundle is None and checkpoint is None:
        console.print(
            "[bold yellow]embedded default:[/bold yellow] UNTRAINED seeded ViT-B/14 at 322 and a "
            "synthetic dataset — latencies are real, recall says nothing about FoL's accuracy",
            soft_wrap=True,
        )
    options = BenchOptions(
        engine,
        bundle,
        checkpoint,
        dataset,
        resolution,
        rerank_k,
        batch,
        warmup,
        reranker,
        cast(TokenFormat, tokens),
        positions,
        positive_radius,
    )
    runner = Bench(options, say=lambda msg: console.print(f"[dim]{msg}[/dim]", soft_wrap=True))
    interrupted = False
    try:
        report = runner.run()
    except KeyboardInterrupt:
        interrupted = True
        report = runner.report
        console.print("[yellow]interrupted: what was measured so far follows[/yellow]")
    stdout.print(markdown(report), markup=False, highlight=False, soft_wrap=True)
    if json_out:
        write_json(report, json_out)
    if markdown_out:
        markdown_out.write_text(markdown(report))
    if plot:
        chart(report, plot)
    if interrupted:
        raise typer.Exit(130)
