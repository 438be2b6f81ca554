"""Build, resume and extend a sharded map (format: `shards.py`), shard by shard.

A build plans the shards in the manifest, then hands one `ShardJob` per unfinished shard to a
runner: `LocalRunner` runs them here one after another with one encoder; the Ray runner
(`fol_infer.distributed`) runs one task per shard. A job resumes its shard from the shard's
last commit, so a job run twice (a retried task) stores no image twice. Factories that train
(IVF, PQ, SQ) are built in two passes: every shard is encoded, the quantizer is trained once
on descriptors in global order, exactly as a single index would train, then each shard adds its
descriptors to a copy of it. The ``complete`` mark is written last, with the global id offsets.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from fol_infer.backends.base import Encoder
from fol_infer.bundle import Bundle
from fol_infer.errors import UsageError
from fol_infer.files.atomic import holds_only_leftovers, remove_leftovers, replace_folder
from fol_infer.files.ownership import check_replaceable, occupied
from fol_infer.images import find_images
from fol_infer.index.build import BuildSettings, encode_into, seal_index
from fol_infer.index.database import DESCRIPTORS, EXTEND_CHUNK, METADATA, REBUILD_SUFFIX
from fol_infer.index.global_index import GlobalIndex
from fol_infer.index.lock import WriterLock
from fol_infer.index.metadata import IndexMetadata
from fol_infer.index.shards import (
    PRODUCT,
    QUANTIZER,
    MapManifest,
    ShardEntry,
    is_map,
    plan_ranges,
    shard_name,
)
from fol_infer.index.token_store import TokenStore
from fol_infer.progress import Advance

MapMode = Literal["new", "append", "force"]


@dataclass(frozen=True)
class ShardJob:
    """What one shard's build needs; plain values, so that it travels to a Ray task."""

    bundle: str
    root: str
    folder: str
    settings: BuildSettings
    files: tuple[str, ...] = ()  # absolute paths still to encode (none: seal only)
    quantizer: str | None = None  # trained empty index to add to; None: a fresh factory
    seal: bool = True  # also write the shard's FAISS file and its complete mark
    decode_threads: int = 2


def shard_complete(folder: Path) -> bool:
    if not (folder / METADATA).is_file():
        return False
    return bool(IndexMetadata.load(folder / METADATA).settings.get("complete", False))


def run_shard_job(job: ShardJob, encoder: Encoder | None, progress: Advance | None = None) -> int:
    """Encode the job's files into its shard (resuming), seal it if asked; its image count.
    `encoder` may be None for a job without files."""
    folder = Path(job.folder)
    if not shard_complete(folder):
        if job.files:
            assert encoder is not None, "a job with files needs an encoder"
            bundle, files = Bundle.open(job.bundle), [Path(f) for f in job.files]
            encode_into(
                bundle,
                encoder,
                Path(job.root),
                files,
                folder,
                job.settings,
                progress,
                job.decode_threads,
            )
        if job.seal:
            quantizer = job.quantizer
            seal_index(folder, GlobalIndex.open(quantizer, device="cpu") if quantizer else None)
    return len(IndexMetadata.load(folder / METADATA).paths)


class ShardRunner(Protocol):
    def run(self, jobs: Sequence[ShardJob], progress: Advance | None) -> None:
        """Run every job to completion (or raise)."""


class LocalRunner:
    """Jobs in this process, one after another, with one already-open encoder."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder

    def run(self, jobs: Sequence[ShardJob], progress: Advance | None) -> None:
        total = sum(len(j.files) for j in jobs)

        def overall(n: int, _shard_total: int | None = None) -> None:
            """A shard reports against its own size; the bar counts the whole build."""
            if progress:
                progress(n, total)

        for job in jobs:
            run_shard_job(job, self.encoder, overall)


@dataclass
class MapReport:
    folder: Path
    added: int
    total: int
    shards: int
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    approximate: bool = False  # graph factories: see MapManifest.approximate

    @property
    def images_per_second(self) -> float:
        return self.added / self.seconds if self.seconds else 0.0


def build_map(
    bundle: Bundle,
    db_folder: str | Path,
    out: str | Path,
    runner: ShardRunner,
    settings: BuildSettings | None = None,
    shards: int | None = None,
    mode: MapMode = "new",
    progress: Advance | None = None,
    wait: bool = False,
    notice: Callable[[str], None] | None = None,
) -> MapReport:
    """Build (or resume, or extend with `shards` new shards, default 1) the map at `out`,
    holding the map's writer lock throughout (each shard job also takes its shard's)."""
    settings = settings or BuildSettings()
    out, root, start = Path(os.path.abspath(out)), Path(db_folder).resolve(), time.perf_counter()
    files = find_images([root])
    if not files:
        raise UsageError(f"no images found under {db_folder} (looked for jpg, png, ...)")
    with WriterLock(out, wait=wait, notice=notice):
        work, manifest = _prepare(bundle, out, root, settings, mode)
        before = manifest.images if manifest.pending_from else 0
        todo = {} if manifest.complete else _plan(manifest, files, shards, settings.batch, work)
        if todo:
            work.mkdir(parents=True, exist_ok=True)  # only now: a refused plan leaves nothing
            remove_leftovers(work)
            manifest.save(work)
            _run_jobs(bundle, work, manifest, todo, runner, settings, progress)
        elif work == out:  # an append that finds nothing new: the map is left as it was
            return MapReport(out, 0, manifest.images, len(manifest.shards))
        failures = _finish(work, manifest)  # (again, for a --force killed before its swap)
        if work != out:
            replace_folder(work, out)
    added = manifest.images - before
    report = MapReport(out, added, manifest.images, len(manifest.shards), failures)
    report.approximate = manifest.approximate
    report.seconds = time.perf_counter() - start
    return report


def _run_jobs(
    bundle: Bundle,
    work: Path,
    manifest: MapManifest,
    todo: dict[int, list[Path]],
    runner: ShardRunner,
    settings: BuildSettings,
    progress: Advance | None,
) -> None:
    """One job per unfinished shard; trained factories: encode all, train, then seal all."""
    dim = bundle.manifest.descriptor_dim
    untrained = GlobalIndex.create(dim, settings.factory, device="cpu").is_trained
    quantizer = work / QUANTIZER
    one_pass = untrained or quantizer.is_file()
    jobs = [
        ShardJob(
            str(bundle.folder),
            manifest.root,
            str(work / manifest.shards[i].name),
            settings,
            files=tuple(str(f) for f in files),
            quantizer=str(quantizer) if quantizer.is_file() else None,
            seal=one_pass,
        )
        for i, files in todo.items()
    ]
    runner.run(jobs, progress)
    if not one_pass:
        train_quantizer(work, manifest, settings.factory, dim).save(quantizer)
        seal = [
            ShardJob(j.bundle, j.root, j.folder, settings, quantizer=str(quantizer)) for j in jobs
        ]
        runner.run(seal, None)


def _prepare(
    bundle: Bundle, out: Path, root: Path, settings: BuildSettings, mode: MapMode
) -> tuple[Path, MapManifest]:
    """The folder to build in and its manifest: new, being resumed, or being appended to
    (the folder itself is made once the shards are planned). ``--force`` builds in
    ``<map>.rebuild``, resuming one an interrupted ``--force`` left with the same bundle and
    settings; a complete manifest is returned only for such a rebuild, whose swap is left."""
    if (out / METADATA).is_file():
        raise UsageError(f"{out} holds a single index, not a map: choose another --out")
    if mode == "append" and not is_map(out):
        raise UsageError(f"--append: {out} is not a map yet; build it first")
    work = out
    if mode == "force":
        inputs = {"database folder": root, "bundle": bundle.folder}
        check_replaceable(out, PRODUCT, inputs)
        rebuild = out.with_name(out.name + REBUILD_SUFFIX)
        check_replaceable(rebuild, PRODUCT, inputs)  # an interrupted --force's, or nothing
        if out.exists() or rebuild.exists():
            work = rebuild
            if not _same_map_build(rebuild, bundle, settings, root):
                shutil.rmtree(rebuild, ignore_errors=True)
    elif out.exists() and not is_map(out) and (not out.is_dir() or not holds_only_leftovers(out)):
        raise UsageError(occupied(out, PRODUCT))
    if not is_map(work):
        dim = bundle.manifest.descriptor_dim
        probe = GlobalIndex.create(dim, settings.factory, device="cpu")
        manifest = MapManifest(
            root=str(root),
            bundle_sha256=bundle.manifest.fingerprint,
            bundle_name=str(bundle.folder),
            settings=settings.to_dict() | {"resolution": list(bundle.resolution)},
            approximate=probe.searches_a_graph,
        )
        return work, manifest
    manifest = MapManifest.load(work)
    manifest.check_bundle(bundle.manifest.fingerprint, str(bundle.folder))
    settings.check_same(manifest.settings, work)
    if manifest.complete and mode == "new":
        raise UsageError(f"{out} already holds a map: pass --append to add images or --force")
    if not manifest.complete and mode == "append" and manifest.pending_from == 0:
        raise UsageError(
            f"--append: {out} is not complete (its first build was interrupted): re-run the "
            "same fol-infer index command without --append to finish it, then append"
        )
    if manifest.complete and mode == "append":  # an append starts here
        manifest.pending_from, manifest.complete = len(manifest.shards), False
    return work, manifest


def _same_map_build(work: Path, bundle: Bundle, settings: BuildSettings, root: Path) -> bool:
    """Whether `work` is a map begun from this database by this bundle with these settings
    (an interrupted --force of the same command, which resumes it)."""
    if not is_map(work):
        return False
    try:
        manifest = MapManifest.load(work)
        manifest.check_bundle(bundle.manifest.fingerprint)
        settings.check_same(manifest.settings, work)
    except UsageError:
        return False
    return manifest.root == str(root)


def _plan(
    manifest: MapManifest, files: list[Path], shards: int | None, batch: int, out: Path
) -> dict[int, list[Path]]:
    """Files of each pending shard (none: nothing new to append); new shards are added to
    the manifest, planned ones must still split the same way."""
    namer = IndexMetadata(root=manifest.root, bundle_sha256="")
    first = manifest.pending_from or 0
    known: set[str] = set()
    for entry in manifest.shards[:first]:
        meta = IndexMetadata.load(out / entry.name / METADATA)
        known.update(meta.paths, (p for p, _ in meta.failures))
    new = [f for f in files if namer.name_of(f) not in known]
    if not new:
        return {}
    planned = manifest.shards[first:]
    if planned and shards not in (None, len(planned)):
        raise UsageError(f"this build was planned with --shards {len(planned)}: re-run with it")
    count = len(planned) or (1 if shards is None else shards)
    ranges = plan_ranges(len(new), count, batch)
    entries = [
        ShardEntry(
            shard_name(first + i), len(r), namer.name_of(new[r[0]]), namer.name_of(new[r[-1]])
        )
        for i, r in enumerate(ranges)
    ]
    if planned and [(e.name, e.files, e.first, e.last) for e in planned] != [
        (e.name, e.files, e.first, e.last) for e in entries
    ]:
        raise UsageError(
            f"the images under {manifest.root} changed since this map's build started (or "
            f"--batch differs): restore them and re-run with --batch {manifest.settings['batch']}"
            ", or rebuild with --force"
        )
    manifest.shards[first:] = entries
    return {first + i: [new[j] for j in r] for i, r in enumerate(ranges)}


def train_quantizer(work: Path, manifest: MapManifest, factory: str, dim: int) -> GlobalIndex:
    """Train on descriptors in global order, in the chunks a single index adds them in."""
    index = GlobalIndex.create(dim, factory, device="cpu")
    buffered: list[np.ndarray] = []
    for entry in manifest.shards:
        meta = IndexMetadata.load(work / entry.name / METADATA)
        with TokenStore.open(work / entry.name / DESCRIPTORS) as store:
            for a in range(0, len(meta.paths), EXTEND_CHUNK):
                rows = store.get(range(a, min(a + EXTEND_CHUNK, len(meta.paths))))
                buffered.extend(r.astype(np.float32) for r in rows)
                while len(buffered) >= EXTEND_CHUNK and not index.is_trained:
                    index.add(np.concatenate(buffered[:EXTEND_CHUNK]))
                    del buffered[:EXTEND_CHUNK]
                if index.is_trained:
                    return index.trained_empty()
    if buffered:
        index.add(np.concatenate(buffered))
    return index.trained_empty()


def _finish(work: Path, manifest: MapManifest) -> list[tuple[str, str]]:
    """Record each shard's image count and global id offset, then the complete mark."""
    offset, failures = 0, []
    for entry in manifest.shards:
        meta = IndexMetadata.load(work / entry.name / METADATA)
        if not meta.settings.get("complete", False):
            raise UsageError(f"shard {entry.name} of {work} did not finish: re-run the command")
        entry.images, entry.offset = len(meta.paths), offset
        offset += entry.images
        failures.extend(meta.failures)
    if offset == 0:
        raise UsageError(f"none of the images under {manifest.root} could be read")
    manifest.complete, manifest.pending_from = True, None
    manifest.save(work)
    return failures
