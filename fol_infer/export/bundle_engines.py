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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fol_infer.bundle import Bundle
from fol_infer.choices import EngineBuildMode, Precision
from fol_infer.errors import UsageError
from fol_infer.export.rerank_engine import DEFAULT_RERANK_CHUNK, chunk_profile
from fol_infer.files.atomic import fsync_dir
from fol_infer.progress import Progress, silent
from fol_infer.trt.record import EngineRecord, GpuInfo, Profile

if TYPE_CHECKING:
    from fol_infer.trt.build import BuildResult


@dataclass(frozen=True)
class EngineSettings:
    """How `build-trt` builds a bundle's engines, checked when made (before TensorRT is
    imported, so a wrong value fails fast on any machine). fp16 keeps the precision plan's
    nodes fp32: per-layer constraints on TensorRT 10, a mixed-precision graph built strongly
    typed on TensorRT 11 (or on 10 with `strongly_typed`). The rerank engine (float16
    candidates, float32 arithmetic) takes up to `rerank_chunk` candidates a run."""

    precision: Precision = Precision.FP16
    max_batch: int = 32
    opt_batch: int | None = None
    workspace_gib: float | None = None
    timing_cache: Path | None = None
    strongly_typed: bool = False
    rerank_chunk: int = DEFAULT_RERANK_CHUNK

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", Precision.parse(self.precision, "--precision"))
        Profile.for_batch(self.max_batch, self.opt_batch)  # raises on a wrong batch
        chunk_profile(self.rerank_chunk)
        workspace = self.workspace_gib
        if workspace is not None and not (math.isfinite(workspace) and workspace > 0):
            raise UsageError(f"--workspace must be a positive number of GiB, not {workspace}")
        if self.timing_cache is not None:
            object.__setattr__(self, "timing_cache", Path(self.timing_cache))
            if self.timing_cache.is_dir():
                raise UsageError(f"--timing-cache {self.timing_cache} is a folder: give a file")

    @property
    def profile(self) -> Profile:
        return Profile.for_batch(self.max_batch, self.opt_batch)

    def mode(self, tensorrt: str) -> EngineBuildMode:
        """How fp16 is obtained with this TensorRT (see the class doc)."""
        from fol_infer.trt.library import major

        if self.precision == Precision.FP32:
            return "fp32"
        return "strongly-typed" if self.strongly_typed or major(tensorrt) >= 11 else "constraints"


@dataclass(frozen=True)
class BuildTarget:
    """Where engines are built: this TensorRT on this GPU, into a temporary folder."""

    bundle: Bundle
    tensorrt: str
    gpu: GpuInfo
    workdir: Path


def build_bundle_engines(
    bundle_dir: str | Path,
    settings: EngineSettings | None = None,
    progress: Progress | None = None,
    notes: Progress | None = None,
) -> dict[str, EngineRecord]:
    """Build one engine per graph (`build_graph_engine`, the rerank engine with them), then
    `commit_engines`; returns the new records by graph name. `notes` receives the lines
    worth keeping (what was pinned, a refused timing cache); on TensorRT 10 the pins are also
    written beside each engine (`.pins.json`). A bundle exported before rerank.onnx existed
    gets no rerank engine, with a note."""
    from fol_infer.export.rerank_engine import build_rerank_engine
    from fol_infer.trt.library import require_tensorrt
    from fol_infer.trt.record import current_gpu

    settings = settings or EngineSettings()
    say, note = progress or silent, notes or progress or silent
    bundle = Bundle.open(bundle_dir, verify="full")
    version = require_tensorrt()
    gpu = current_gpu()
    records: dict[str, EngineRecord] = {}
    with tempfile.TemporaryDirectory(prefix=".trt-build-", dir=bundle.folder) as tmp:
        target = BuildTarget(bundle, version, gpu, Path(tmp))
        for graph in bundle.manifest.graphs:
            start = time.perf_counter()
            record, result = build_graph_engine(target, graph, settings, say)
            records[graph] = _keep(target, record, result, start, say, note)
        if bundle.manifest.rerank is None:
            note(
                "no rerank.onnx (exported before the re-rank graph): re-export for a rerank engine"
            )
        else:
            start = time.perf_counter()
            say(f"building the rerank engine (chunks of up to {settings.rerank_chunk} candidates)")
            chunks = chunk_profile(settings.rerank_chunk)
            record, result = build_rerank_engine(
                bundle, target.workdir, chunks, version, gpu, settings.workspace_gib,
                settings.timing_cache, say,
            )  # fmt: skip
            records[record.graph] = _keep(target, record, result, start, say, note)
        commit_engines(target, records)
    return records


def build_graph_engine(
    target: BuildTarget, graph: str, settings: EngineSettings, say: Progress
) -> tuple[EngineRecord, BuildResult]:
    """One encoder graph's engine, built into `target.workdir`, and its manifest record."""
    from fol_infer.export.precision import plan_file, write_mixed
    from fol_infer.trt.build import BuildOptions, build_engine
    from fol_infer.trt.record import engine_file

    bundle, spec = target.bundle, target.bundle.manifest.graphs[graph]
    mode, profile = settings.mode(target.tensorrt), settings.profile
    source, plan = bundle.path(graph), None
    if mode == "strongly-typed":
        say(f"writing the mixed-precision {graph} graph")
        source = target.workdir / source.name
        plan = write_mixed(bundle.path(graph), source)
    elif mode == "constraints":
        plan = plan_file(source)
    options = BuildOptions(
        precision=settings.precision,
        strongly_typed=mode == "strongly-typed",
        batch=(profile.min, profile.opt, profile.max),
        workspace_gib=settings.workspace_gib,
        timing_cache=settings.timing_cache,
    )
    fp32 = {n: plan.outputs[n] for n in plan.fp32} if plan and mode == "constraints" else None
    shapes = {t.name: [int(d) for d in t.shape[1:]] for t in spec.inputs}
    result = build_engine(source, shapes, options, fp32, say)
    record = EngineRecord(
        graph=graph,
        file=engine_file(graph, settings.precision),
        sha256=hashlib.sha256(result.engine).hexdigest(),
        bytes=len(result.engine),
        onnx_sha256=spec.sha256,
        tensorrt=target.tensorrt,
        gpu=target.gpu.name,
        compute_capability=target.gpu.compute_capability,
        precision=settings.precision,
        mode=mode,
        profile=profile,
        workspace_gib=settings.workspace_gib,
        fp32_nodes=len(plan.fp32) if plan else 0,
        built=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    return record, result


def commit_engines(target: BuildTarget, records: dict[str, EngineRecord]) -> None:
    """Every engine built: move them (and their pins and layer files) over the old ones,
    record them in the manifest (written atomically), then delete engines no record names."""
    from fol_infer.trt.record import engine_files, set_records

    folder = target.bundle.folder
    for record in records.values():
        for name in engine_files(record.file):
            if (target.workdir / name).exists():
                os.replace(target.workdir / name, folder / name)
            else:  # no pins for this build: an older build's must not describe it
                (folder / name).unlink(missing_ok=True)
    fsync_dir(folder)
    manifest = target.bundle.manifest
    old = {r.get("file") for r in manifest.engines.values()} - {r.file for r in records.values()}
    set_records(manifest, records)
    manifest.write(folder)
    for name in old:
        for stale in engine_files(str(name)):
            (folder / stale).unlink(missing_ok=True)


def _keep(
    target: BuildTarget,
    record: EngineRecord,
    result: BuildResult,
    start: float,
    say: Progress,
    note: Progress,
) -> EngineRecord:
    """Pass the build's notes on and write its engine into the work folder."""
    for line in result.notes:
        note(line)
    _write_engine(target.workdir, target.bundle.folder, record, result, start, say)
    return record


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
