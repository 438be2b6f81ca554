"""The build-trt step on a bundle: one TensorRT engine per graph (the encoder's two and the
re-ranker's), recorded in its manifest.

Arguments are checked before TensorRT is imported, so a typo fails fast on any machine. The
engines are built in a temporary folder inside the bundle and replace the old ones only when
all are built; the manifest is then rewritten atomically.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fol_infer.choices import EngineBuildMode, Precision
from fol_infer.errors import UsageError
from fol_infer.export.rerank_engine import DEFAULT_RERANK_CHUNK, chunk_profile
from fol_infer.files.atomic import fsync_dir
from fol_infer.progress import Progress, silent
from fol_infer.trt.record import EngineRecord, Profile

if TYPE_CHECKING:
    from fol_infer.trt.build import BuildResult


def build_bundle_engines(
    bundle_dir: str | Path,
    precision: Precision | str = Precision.FP16,
    max_batch: int = 32,
    workspace_gib: float | None = None,
    timing_cache: str | Path | None = None,
    progress: Progress | None = None,
    opt_batch: int | None = None,
    strongly_typed: bool = False,
    notes: Progress | None = None,
    rerank_chunk: int = DEFAULT_RERANK_CHUNK,
) -> dict[str, EngineRecord]:
    """Build, write and record one engine per graph; returns the new records by graph name.

    fp16 keeps the precision plan's nodes fp32: per-layer constraints on TensorRT 10, a
    mixed-precision graph built strongly typed on TensorRT 11 (or on 10 with `strongly_typed`).
    `notes` receives the lines worth keeping (what was pinned, a refused timing cache); on
    TensorRT 10 the pins are also written beside each engine (`.pins.json`). The rerank engine
    (float16 candidates, float32 arithmetic) takes up to `rerank_chunk` candidates a run; a
    bundle exported before rerank.onnx existed gets none, with a note.
    """
    from fol_infer.bundle import Bundle
    from fol_infer.export.precision import plan_file, write_mixed
    from fol_infer.export.rerank_engine import build_rerank_engine
    from fol_infer.trt.build import BuildOptions, build_engine
    from fol_infer.trt.library import major, require_tensorrt
    from fol_infer.trt.record import current_gpu, engine_file, engine_files, set_records

    say = progress or silent
    note = notes or say
    precision = Precision.parse(precision, "--precision")
    profile = Profile.for_batch(max_batch, opt_batch)
    chunks = chunk_profile(rerank_chunk)
    if workspace_gib is not None and not (math.isfinite(workspace_gib) and workspace_gib > 0):
        raise UsageError(f"--workspace must be a positive number of GiB, not {workspace_gib}")
    cache = Path(timing_cache) if timing_cache is not None else None
    if cache is not None and cache.is_dir():
        raise UsageError(f"--timing-cache {cache} is a folder: give a file path")
    bundle = Bundle.open(bundle_dir, verify="full")
    version = require_tensorrt()
    gpu = current_gpu()
    mode: EngineBuildMode
    if precision == Precision.FP32:
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
            _write_engine(Path(tmp), bundle.folder, records[graph], result, start, say)
        if bundle.manifest.rerank is None:
            note(
                "no rerank.onnx (exported before the re-rank graph): re-export for a rerank engine"
            )
        else:
            start = time.perf_counter()
            say(f"building the rerank engine (chunks of up to {rerank_chunk} candidates)")
            record, result = build_rerank_engine(
                bundle, Path(tmp), chunks, version, gpu, workspace_gib, cache, say
            )
            for line in result.notes:
                note(line)
            records[record.graph] = record
            _write_engine(Path(tmp), bundle.folder, record, result, start, say)
        for record in records.values():  # all built: only now replace the old engines
            for name in engine_files(record.file):
                if (Path(tmp) / name).exists():
                    os.replace(Path(tmp) / name, bundle.folder / name)
                else:  # no pins for this build: an older build's must not describe it
                    (bundle.folder / name).unlink(missing_ok=True)
        fsync_dir(bundle.folder)
    old = {r.get("file") for r in bundle.manifest.engines.values()} - {
        r.file for r in records.values()
    }
    set_records(bundle.manifest, records)
    bundle.manifest.write(bundle.folder)
    for name in old:
        for stale in engine_files(str(name)):
            (bundle.folder / stale).unlink(missing_ok=True)
    return records


def _write_engine(
    tmp: Path, folder: Path, record: EngineRecord, result: BuildResult, start: float, say: Progress
) -> None:
    """Write one built engine into ``tmp`` and load it back; the built layers' precisions (and
    on TensorRT 10 the pins) are kept beside it for inspection."""
    from fol_infer.trt.record import LAYERS_SUFFIX, PINS_SUFFIX, rebuild_command
    from fol_infer.trt.run import EngineSession

    built = tmp / record.file
    built.write_bytes(result.engine)
    session = EngineSession(result.engine, built, rebuild_command(folder, record))
    try:
        built.with_suffix(LAYERS_SUFFIX).write_text(session.layer_info())
    finally:
        session.close()
    if result.pins is not None:
        built.with_suffix(PINS_SUFFIX).write_text(json.dumps(result.pins.to_dict(), indent=1))
    took = time.perf_counter() - start
    say(f"{built.name}: {len(result.engine) / 2**20:.1f} MiB in {took:.0f} s")
