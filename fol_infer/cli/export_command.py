"""`fol-infer export`: a checkpoint to a bundle (ONNX graphs, manifest, reference outputs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fol_infer.choices import Precision
from fol_infer.cli.app import app, console, friendly_errors, status
from fol_infer.cli.options import choice, refuse_unused
from fol_infer.images import DEFAULT_RESOLUTION


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
        from fol_infer.cli.build_trt_command import build_and_report
        from fol_infer.export.bundle_engines import EngineSettings

        build_and_report(bundle, EngineSettings(precision, max_batch))
