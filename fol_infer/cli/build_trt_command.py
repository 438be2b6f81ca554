"""`fol-infer build-trt`: TensorRT engines for a bundle's graphs, recorded in its manifest.

The work is `fol_infer.export.bundle_engines.build_bundle_engines` with an `EngineSettings`;
`build_and_report` wraps it in a spinner and a table for `build-trt` and `export --trt`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from fol_infer.choices import Precision
from fol_infer.cli.app import app, console, friendly_errors, status, stdout
from fol_infer.cli.options import bounded, choice, float_option
from fol_infer.export.rerank_engine import DEFAULT_RERANK_CHUNK
from fol_infer.files.ownership import check_outputs

if TYPE_CHECKING:
    from fol_infer.export.bundle_engines import EngineSettings


@app.command("build-trt")
@friendly_errors
def build_trt(
    bundle_dir: Annotated[Path, typer.Argument(help="Bundle folder (from fol-infer export).")],
    precision: Annotated[
        Precision,
        choice(
            Precision,
            "fp16 keeps norms, softmax, Sinkhorn, L2 norms and rankings in fp32.",
            "--precision",
        ),
    ] = Precision.FP16,
    max_batch: Annotated[
        int, typer.Option(min=1, help="Largest batch the engines take (profile 1..N).")
    ] = 32,
    opt_batch: Annotated[
        int | None, typer.Option(min=1, help="Batch TensorRT tunes for (default: --max-batch).")
    ] = None,
    workspace: Annotated[
        float | None,
        float_option(
            "Builder workspace in GiB, > 0 (default: TensorRT's).",
            bounded(0.0, above=True),
            metavar="GIB",
        ),
    ] = None,
    timing_cache: Annotated[
        Path | None, typer.Option(help="Timing cache file, read and updated: faster rebuilds.")
    ] = None,
    strongly_typed: Annotated[
        bool, typer.Option(help="TensorRT 10: fp16 from a mixed-precision graph, as on 11.")
    ] = False,
    rerank_chunk: Annotated[
        int,
        typer.Option(min=1, help="Candidates per run of the rerank engine (GPU memory per run)."),
    ] = DEFAULT_RERANK_CHUNK,
) -> None:
    """Build TensorRT engines for a bundle on this GPU (engines only run where they were built)."""
    from fol_infer.export.bundle_engines import EngineSettings

    check_outputs({"--timing-cache": timing_cache}, {"bundle": bundle_dir})
    settings = EngineSettings(
        precision, max_batch, opt_batch, workspace, timing_cache, strongly_typed, rerank_chunk
    )
    build_and_report(bundle_dir, settings)


def build_and_report(bundle_dir: Path, settings: EngineSettings) -> None:
    """Build with a spinner, then print one table row per engine (build-trt, export --trt)."""
    from fol_infer.export.bundle_engines import build_bundle_engines

    start = time.perf_counter()
    with status("building TensorRT engines") as say:
        records = build_bundle_engines(
            bundle_dir,
            settings,
            say,
            notes=lambda line: console.print(line, markup=False, highlight=False),
        )
    table = Table(title=f"{bundle_dir}: TensorRT engines ({time.perf_counter() - start:.0f} s)")
    for column in ("graph", "file", "MiB", "precision", "batch", "fp32 nodes", "TensorRT", "GPU"):
        table.add_column(column)
    for r in records.values():
        table.add_row(
            r.graph,
            r.file,
            f"{r.bytes / 2**20:.1f}",
            f"{r.precision} ({r.mode})",
            f"{r.profile.min}..{r.profile.max}",
            str(r.fp32_nodes),
            r.tensorrt,
            f"{r.gpu} ({r.compute_capability})",
        )
    stdout.print(table)
