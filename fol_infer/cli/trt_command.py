"""`fol-infer build-trt`: TensorRT engines for a bundle's two graphs, recorded in its manifest.

`build_bundle_engines` is the whole step, callable from `fol-infer export --trt` too. Arguments
are checked before TensorRT is imported, so a typo fails fast on any machine.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fol_infer.cli.app import app, console, friendly_errors, stdout
from fol_infer.errors import UsageError
from fol_infer.export.engines import PRECISIONS, EngineRecord, Profile

Progress = Callable[[str], None]


def build_bundle_engines(
    bundle_dir: str | Path,
    precision: str = "fp16",
    max_batch: int = 32,
    workspace_gib: float | None = None,
    timing_cache: str | Path | None = None,
    progress: Progress | None = None,
    opt_batch: int | None = None,
    strongly_typed: bool = False,
    notes: Progress | None = None,
) -> dict[str, EngineRecord]:
    """Build, write and record one engine per graph; returns the new records by graph name.

    fp16 keeps the precision plan's nodes fp32: per-layer constraints on TensorRT 10, a
    mixed-precision graph built strongly typed on TensorRT 11 (or on 10 with `strongly_typed`).
    `notes` receives the lines worth keeping (what was pinned, a refused timing cache); on
    TensorRT 10 the pins are also written beside each engine (`.pins.json`).
    """
    from fol_infer.bundle import Bundle
    from fol_infer.export.engines import (
        LAYERS_SUFFIX,
        PINS_SUFFIX,
        current_gpu,
        engine_file,
        engine_files,
        rebuild_command,
        set_records,
    )
    from fol_infer.export.precision import plan_file, write_mixed
    from fol_infer.export.trt_build import (
        BuildOptions,
        EngineSession,
        build_engine,
        major,
        require_tensorrt,
    )

    say = progress or (lambda _msg: None)
    note = notes or say
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    profile = Profile.for_batch(max_batch, opt_batch)
    if workspace_gib is not None and not workspace_gib > 0:
        raise UsageError(f"--workspace must be a positive number of GiB, not {workspace_gib}")
    cache = Path(timing_cache) if timing_cache is not None else None
    if cache is not None and cache.is_dir():
        raise UsageError(f"--timing-cache {cache} is a folder: give a file path")
    bundle = Bundle.open(bundle_dir, verify="full")
    version = require_tensorrt()
    gpu = current_gpu()
    if precision == "fp32":
        mode = "fp32"
    else:
        mode = "strongly-typed" if strongly_typed or major(version) >= 11 else "constraints"
    records: dict[str, EngineRecord] = {}
    with tempfile.TemporaryDirectory(prefix=".trt-build-", dir=bundle.folder) as tmp:
        for graph, spec in bundle.manifest.graphs.items():
            source = bundle.path(graph)
            plan = None
            if mode == "strongly-typed":
                say(f"writing the mixed-precision {graph} graph")
                source = Path(tmp) / source.name
                plan = write_mixed(bundle.path(graph), source)
            elif mode == "constraints":
                plan = plan_file(source)
            options = BuildOptions(
                precision=precision,
                strongly_typed=mode == "strongly-typed",
                batch=(profile.min, profile.opt, profile.max),
                workspace_gib=workspace_gib,
                timing_cache=cache,
            )
            fp32 = (
                {n: plan.outputs[n] for n in plan.fp32} if plan and mode == "constraints" else None
            )
            shapes = {t.name: [int(d) for d in t.shape[1:]] for t in spec.inputs}
            start = time.perf_counter()
            result = build_engine(source, shapes, options, fp32, say)
            for line in result.notes:
                note(line)
            records[graph] = EngineRecord(
                graph=graph,
                file=engine_file(graph, precision),
                sha256=hashlib.sha256(result.engine).hexdigest(),
                bytes=len(result.engine),
                onnx_sha256=spec.sha256,
                tensorrt=version,
                gpu=gpu.name,
                compute_capability=gpu.compute_capability,
                precision=precision,
                mode=mode,
                profile=profile,
                workspace_gib=workspace_gib,
                fp32_nodes=len(plan.fp32) if plan else 0,
                built=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            )
            built = Path(tmp) / records[graph].file
            built.write_bytes(result.engine)
            rebuild = rebuild_command(bundle.folder, records[graph])
            session = EngineSession(result.engine, built, rebuild)
            try:  # it loads back here; the built layers' precisions are kept for inspection
                built.with_suffix(LAYERS_SUFFIX).write_text(session.layer_info())
            finally:
                session.close()
            if result.pins is not None:
                pins = json.dumps(result.pins.to_dict(), indent=1)
                built.with_suffix(PINS_SUFFIX).write_text(pins)
            took = time.perf_counter() - start
            say(f"{built.name}: {len(result.engine) / 2**20:.1f} MiB in {took:.0f} s")
        for record in records.values():  # all built: only now replace the old engines
            for name in engine_files(record.file):
                if (Path(tmp) / name).exists():
                    os.replace(Path(tmp) / name, bundle.folder / name)
                else:  # no pins for this build: an older build's must not describe it
                    (bundle.folder / name).unlink(missing_ok=True)
    old = {r.get("file") for r in bundle.manifest.engines.values()} - {
        r.file for r in records.values()
    }
    set_records(bundle.manifest, records)
    bundle.manifest.write(bundle.folder)
    for name in old:
        for stale in engine_files(str(name)):
            (bundle.folder / stale).unlink(missing_ok=True)
    return records


@app.command("build-trt")
@friendly_errors
def build_trt(
    bundle_dir: Annotated[Path, typer.Argument(help="Bundle folder (from fol-infer export).")],
    precision: Annotated[
        str,
        typer.Option(help="fp16 (norms, softmax, Sinkhorn, L2 norms, rankings kept fp32) or fp32."),
    ] = "fp16",
    max_batch: Annotated[
        int, typer.Option(help="Largest batch the engines take (profile 1..N).")
    ] = 32,
    opt_batch: Annotated[
        int | None, typer.Option(help="Batch TensorRT tunes for [max-batch].")
    ] = None,
    workspace: Annotated[
        float | None, typer.Option(help="Builder workspace in GiB [TensorRT's default].")
    ] = None,
    timing_cache: Annotated[
        Path | None, typer.Option(help="Timing cache file, read and updated: faster rebuilds.")
    ] = None,
    strongly_typed: Annotated[
        bool, typer.Option(help="TensorRT 10: fp16 from a mixed-precision graph, as on 11.")
    ] = False,
) -> None:
    """Build TensorRT engines for a bundle on this GPU (engines only run where they were built)."""
    build_and_report(
        bundle_dir, precision, max_batch, workspace, timing_cache, opt_batch, strongly_typed
    )


def build_and_report(
    bundle_dir: Path,
    precision: str,
    max_batch: int,
    workspace: float | None = None,
    timing_cache: Path | None = None,
    opt_batch: int | None = None,
    strongly_typed: bool = False,
) -> None:
    """Build with a spinner, then print one table row per engine (build-trt, export --trt)."""
    start = time.perf_counter()
    with console.status("building TensorRT engines") as spinner:
        records = build_bundle_engines(
            bundle_dir,
            precision,
            max_batch,
            workspace,
            timing_cache,
            progress=lambda msg: spinner.update(msg),
            opt_batch=opt_batch,
            strongly_typed=strongly_typed,
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
