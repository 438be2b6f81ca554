"""`fol-infer bench`: latency per stage, Recall@N before/after re-ranking, parity."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fol_infer.choices import EncoderBackend, RerankBackend, TokenFormat
from fol_infer.cli.app import app, console, friendly_errors, stdout
from fol_infer.cli.options import (
    PositionsOption,
    RadiusOption,
    RerankerOption,
    ThresholdOption,
    choice,
    refuse_unused,
    renamed,
    tokens_option,
)
from fol_infer.errors import UsageError
from fol_infer.files.atomic import Writer, write_outputs
from fol_infer.files.ownership import check_outputs
from fol_infer.images import DEFAULT_RESOLUTION
from fol_infer.positions import RADIUS_M
from fol_infer.rerank.settings import DEFAULT_THRESHOLD, RerankSettings


@app.command(context_settings={"allow_extra_args": True})
@friendly_errors
def bench(
    ctx: typer.Context,
    backend: Annotated[
        EncoderBackend,
        choice(
            EncoderBackend,
            "Encoder backend to measure (--engine: the same).",
            "--backend",
            "--engine",
            "-b",
        ),
    ] = EncoderBackend.ONNX,
    bundle: Annotated[
        Path | None, typer.Option(help="Bundle folder (else exported from --checkpoint).")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Checkpoint (default: an UNTRAINED seeded ViT-B/14).")
    ] = None,
    dataset: Annotated[
        Path | None, typer.Option(help="Dataset root in the standard layout (default: synthetic).")
    ] = None,
    resolution: Annotated[
        str, typer.Option(help="Resolution when exporting from a checkpoint.")
    ] = str(DEFAULT_RESOLUTION),
    rerank_k: Annotated[
        int, typer.Option(min=1, help="Global candidates re-ranked per query.")
    ] = 100,
    batch: Annotated[int, typer.Option(min=1, help="Batch size for database encoding.")] = 8,
    warmup: Annotated[int, typer.Option(min=0, help="Warm-up queries before timing.")] = 2,
    reranker: RerankerOption = RerankBackend.AUTO,
    threshold: ThresholdOption = DEFAULT_THRESHOLD,
    tokens: Annotated[
        TokenFormat, tokens_option("Token format of the index under test.")
    ] = TokenFormat.FP16,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the JSON report (instead of the Markdown).")
    ] = False,
    json_out: Annotated[
        Path | None, typer.Option("--json-out", help="Write the JSON report here.")
    ] = None,
    markdown_out: Annotated[
        Path | None, typer.Option("--markdown-out", help="Write a Markdown summary here.")
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option("--plot-out", help="Write a chart here (.png or .svg; the viz extra)."),
    ] = None,
    markdown_old: Annotated[Path | None, typer.Option("--markdown", hidden=True)] = None,
    plot_old: Annotated[Path | None, typer.Option("--plot", hidden=True)] = None,
    positions: PositionsOption = None,
    positive_radius: RadiusOption = RADIUS_M,
) -> None:
    """Benchmark an encoder backend end to end; with no arguments, on an embedded UNTRAINED
    default."""
    from fol_infer.bench.harness import Bench, BenchOptions
    from fol_infer.bench.report import chart, json_bytes, markdown

    if as_json and len(ctx.args) == 1:  # the old spelling: --json PATH
        as_json, old_json = False, Path(ctx.args[0])
        json_out = renamed(json_out, old_json, "--json PATH", "--json-out PATH")
    elif ctx.args:
        raise UsageError(f"unexpected argument(s): {' '.join(ctx.args)}")
    markdown_out = renamed(markdown_out, markdown_old, "--markdown", "--markdown-out")
    plot = renamed(plot, plot_old, "--plot", "--plot-out")
    if bundle is not None:
        refuse_unused(ctx, {"resolution": "applies when exporting a checkpoint, not to --bundle"})
    if plot is not None:
        from fol_infer.viz.figure import check_out

        check_out(plot)  # before the run, not after it
    inputs = {"bundle": bundle, "checkpoint": checkpoint, "dataset": dataset}
    inputs["positions CSV"] = positions
    outputs = {"--json-out": json_out, "--markdown-out": markdown_out, "--plot-out": plot}
    check_outputs(outputs, {what: p for what, p in inputs.items() if p is not None})
    if bundle is not None and checkpoint is not None and backend != EncoderBackend.TORCH:
        console.print("note: --bundle given; --checkpoint is used only for the PyTorch reference")
    rerank = RerankSettings(threshold, reranker)
    rerank.check_tokens(tokens, "an index of --tokens int8-exact")
    if bundle is None and checkpoint is None:
        console.print(
            "[bold yellow]embedded default:[/bold yellow] UNTRAINED seeded ViT-B/14 at "
            f"{DEFAULT_RESOLUTION} and a synthetic dataset — latencies are real, recall says "
            "nothing about FoL's accuracy",
            soft_wrap=True,
        )
    options = BenchOptions(
        backend=backend,
        bundle=bundle,
        checkpoint=checkpoint,
        dataset=dataset,
        resolution=resolution,
        rerank_k=rerank_k,
        batch=batch,
        warmup=warmup,
        rerank=rerank,
        tokens=tokens,
        positions=positions,
        positive_radius=positive_radius,
    )
    runner = Bench(options, say=lambda msg: console.print(f"[dim]{msg}[/dim]", soft_wrap=True))
    interrupted = False
    try:
        report = runner.run()
    except KeyboardInterrupt:
        interrupted = True
        report = runner.report
        console.print("[yellow]interrupted: what was measured so far follows[/yellow]")
    if as_json:
        print(json_bytes(report).decode(), end="")
    else:
        stdout.print(markdown(report), markup=False, highlight=False, soft_wrap=True)
    files: dict[Path, bytes | Writer] = {}  # all written, or none
    if json_out:
        files[json_out] = json_bytes(report)
    if markdown_out:
        files[markdown_out] = markdown(report).encode()
    if plot:
        files[plot] = chart(report, plot)
    write_outputs(files)
    if interrupted:
        raise typer.Exit(130)
