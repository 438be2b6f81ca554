"""Repair an index, a map, or one shard of a map in place: what `fol-infer repair` runs and
what every "repair:" message of a damaged index or shard names.

Every file is checked at the "full" level (each store commit's crc32, `global.faiss`'s
sha256). What derives from the stored descriptors (`global.faiss`, a map's quantizer) is
rebuilt from them, encoding nothing. Damaged stores, and a shard that is missing or holds
other files than `map.json` records, are encoded again from the database images they list:
an index in its id order, a shard in the order and batches of its build, so that ids (and a
shard's bytes) come back as a build writes them. The re-encoded folder is built beside the
damaged one and swapped in only once it lists exactly the recorded images; a database that
no longer holds them is named, with the `--force` rebuild that remains.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fol_infer.backends.base import Encoder
from fol_infer.bundle import Bundle
from fol_infer.errors import DamagedFileError, IndexStoreError, UsageError, first_line
from fol_infer.files.atomic import replace_folder
from fol_infer.images import find_images
from fol_infer.index.build import BuildSettings, encode_into, seal_index
from fol_infer.index.database import DESCRIPTORS, FAISS_FILE, METADATA, token_layout
from fol_infer.index.global_index import GlobalIndex
from fol_infer.index.lock import WriterLock
from fol_infer.index.map_build import train_quantizer
from fol_infer.index.metadata import IndexMetadata
from fol_infer.index.shards import QUANTIZER, MapManifest, ShardEntry, is_map, name_key
from fol_infer.index.token_store import TokenStore
from fol_infer.progress import Advance

EncoderFor = Callable[[Bundle], Encoder]  # opens an encoder of the recorded bundle, when needed
DAMAGE = (IndexStoreError, DamagedFileError)


@dataclass
class RepairReport:
    """What was checked and what was done; `repaired` names each fix."""

    target: Path
    checked: int = 0  # index folders checked (1, or a map's shards)
    repaired: list[str] = field(default_factory=list)


@dataclass
class _Work:
    """What a repair opens once, only if something needs encoding: the bundle and encoder."""

    bundle_folder: str
    encoder_for: EncoderFor
    progress: Advance | None
    bundle: Bundle | None = None
    encoder: Encoder | None = None

    def open(self) -> tuple[Bundle, Encoder]:
        if self.bundle is None:
            self.bundle = Bundle.open(self.bundle_folder)
        if self.encoder is None:
            self.encoder = self.encoder_for(self.bundle)
        return self.bundle, self.encoder

    def close(self) -> None:
        if self.encoder is not None:
            self.encoder.close()


def repair(
    target: str | Path,
    encoder_for: EncoderFor,
    progress: Advance | None = None,
    wait: bool = False,
) -> RepairReport:
    """Check `target` (an index, a map, or a shard folder of a map) and repair what is
    damaged (see module doc), under the writer lock of the index or map."""
    target = Path(os.path.abspath(target))
    if is_map(target):
        return _repair_map(target, None, encoder_for, progress, wait)
    if is_map(target.parent) and target.name in _shard_names(target.parent):
        return _repair_map(target.parent, target.name, encoder_for, progress, wait)
    if not (target / METADATA).is_file():
        raise UsageError(f"{target} is not an index or a map (no {METADATA}, no map.json)")
    report = RepairReport(target, checked=1)
    with WriterLock(target, wait=wait):
        meta = IndexMetadata.load(target / METADATA)
        work = _Work(meta.bundle_name, encoder_for, progress)
        try:
            fix = _fix_index(target, meta, None, work, sorted_files=False)
        finally:
            work.close()
    if fix:
        report.repaired.append(fix)
    return report


def _shard_names(folder: Path) -> set[str]:
    return {entry.name for entry in MapManifest.load(folder).shards}


def _repair_map(
    folder: Path,
    only: str | None,
    encoder_for: EncoderFor,
    progress: Advance | None,
    wait: bool,
) -> RepairReport:
    """Every shard of the map (or `only` that one), then its quantizer; shards whose
    FAISS file derives from a quantizer rebuilt here are rebuilt with it."""
    report = RepairReport(folder if only is None else folder / only)
    with WriterLock(folder, wait=wait):
        manifest = MapManifest.load(folder)
        manifest.require_complete(folder)
        manifest.check_consistent(folder)
        work = _Work(manifest.bundle_name, encoder_for, progress)
        try:
            quantizer = _check_quantizer(folder)
            for entry in manifest.shards:
                if only not in (None, entry.name):
                    continue
                report.checked += 1
                with WriterLock(folder / entry.name, wait=wait):
                    fix = _fix_shard(folder, manifest, entry, quantizer, work)
                if fix:
                    report.repaired.append(f"{entry.name}: {fix}")
            if quantizer is None and (folder / QUANTIZER).is_file():
                _rebuild_quantizer(folder, manifest, report, wait)
        finally:
            work.close()
    return report


def _check_quantizer(folder: Path) -> GlobalIndex | None:
    """The map's trained quantizer (None: it has none, or it is damaged)."""
    if not (folder / QUANTIZER).is_file():
        return None
    try:
        return GlobalIndex.open(folder / QUANTIZER, verify="full", device="cpu")
    except DAMAGE:
        return None


def _rebuild_quantizer(
    folder: Path, manifest: MapManifest, report: RepairReport, wait: bool
) -> None:
    """Train it again from the shards' descriptors, as the build did, and rebuild every
    shard's FAISS file on it."""
    factory = str(manifest.settings["factory"])
    with TokenStore.open(folder / manifest.shards[0].name / DESCRIPTORS) as first:
        dim = first.dim
    quantizer = train_quantizer(folder, manifest, factory, dim)
    quantizer.save(folder / QUANTIZER)
    report.repaired.append(f"{QUANTIZER}: trained again from the stored descriptors")
    for entry in manifest.shards:
        with WriterLock(folder / entry.name, wait=wait):
            seal_index(folder / entry.name, quantizer.trained_empty())
        report.repaired.append(f"{entry.name}: {FAISS_FILE} rebuilt on the new {QUANTIZER}")


def _fix_shard(
    folder: Path,
    manifest: MapManifest,
    entry: ShardEntry,
    quantizer: GlobalIndex | None,
    work: _Work,
) -> str | None:
    """Repair one shard; a shard whose record is lost, or that holds other files than its
    entry, is encoded again from the files its entry covers."""
    path = folder / entry.name
    try:
        meta = IndexMetadata.load(path / METADATA)
        problem = entry.mismatch(meta, manifest.root)
    except DAMAGE:
        meta, problem = None, "its index.json is missing or damaged"
    if meta is None or problem is not None:
        files = _entry_files(folder, manifest, entry)
        _encode_again(path, files, manifest.settings, manifest.root, quantizer, work, entry)
        return f"encoded again from the {entry.files} files map.json records ({problem})"
    return _fix_index(path, meta, quantizer, work, sorted_files=True, entry=entry)


def _fix_index(
    folder: Path,
    meta: IndexMetadata,
    quantizer: GlobalIndex | None,
    work: _Work,
    sorted_files: bool,
    entry: ShardEntry | None = None,
) -> str | None:
    """Repair an index folder whose metadata is readable: its stores, else its FAISS file."""
    damaged = _damaged_stores(folder, meta)
    if damaged is not None:
        names = meta.paths + [name for name, _ in meta.failures]
        if sorted_files:
            names.sort(key=name_key)
        files = [Path(meta.root) / name for name in names]
        _encode_again(folder, files, meta.settings, meta.root, quantizer, work, entry, meta)
        return f"encoded again ({damaged})"
    if _faiss_intact(folder, meta):
        return None
    seal_index(folder, quantizer.trained_empty() if quantizer is not None else None)
    return f"{FAISS_FILE} rebuilt from the stored descriptors"


def _damaged_stores(folder: Path, meta: IndexMetadata) -> str | None:
    """What is wrong with the folder's stores at the "full" level (None: nothing)."""
    names = [DESCRIPTORS, *(name for name, _ in token_layout(meta.settings["tokens"]))]
    for name in names:
        try:
            with TokenStore.open(folder / name, verify="full") as store:
                if len(store) < len(meta.paths):
                    return f"{name} holds {len(store)} of {len(meta.paths)} images"
        except DAMAGE as exc:
            return first_line(exc)
    return None


def _faiss_intact(folder: Path, meta: IndexMetadata) -> bool:
    try:
        index = GlobalIndex.open(folder / FAISS_FILE, verify="full", device="cpu")
    except DAMAGE:
        return False
    with index:
        return len(index) == len(meta.paths) and index.factory == meta.settings["factory"]


def _entry_files(folder: Path, manifest: MapManifest, entry: ShardEntry) -> list[Path]:
    """The database files a shard's entry covers: those from its first to its last file that
    no other shard holds, in the sorted order its build encoded them."""
    root = Path(manifest.root)
    others: set[str] = set()
    for other in manifest.shards:
        if other.name != entry.name:
            meta = IndexMetadata.load(folder / other.name / METADATA)
            others.update(meta.paths, (name for name, _ in meta.failures))
    first, last = name_key(entry.first), name_key(entry.last)
    namer = IndexMetadata(root=manifest.root, bundle_sha256="")
    named = ((f, namer.name_of(f)) for f in find_images([root]))
    files = [f for f, name in named if first <= name_key(name) <= last and name not in others]
    if len(files) != entry.files:
        raise UsageError(
            f"{entry.name} of map {folder} cannot be encoded again: map.json records "
            f"{entry.files} files from {entry.first!r} to {entry.last!r} under {root}, the "
            f"database now holds {len(files)} there; restore them, or rebuild the map: "
            f"{manifest.rebuild_command(folder)}"
        )
    return files


def _encode_again(
    folder: Path,
    files: list[Path],
    settings: dict[str, object],
    root: str,
    quantizer: GlobalIndex | None,
    work: _Work,
    entry: ShardEntry | None,
    meta: IndexMetadata | None = None,
) -> None:
    """Encode `files` into a folder beside `folder` and swap it in once it lists the same
    images (and, for a shard, the count its entry records)."""
    bundle, encoder = work.open()
    build = BuildSettings(
        factory=str(settings["factory"]),
        tokens=str(settings["tokens"]),  # type: ignore[arg-type]
        batch=int(settings["batch"]),  # type: ignore[call-overload]
    )
    fresh = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(fresh, ignore_errors=True)
    try:
        encode_into(bundle, encoder, Path(root), files, fresh, build, work.progress)
        seal_index(fresh, quantizer.trained_empty() if quantizer is not None else None)
        made = IndexMetadata.load(fresh / METADATA).paths
        kept = meta.paths if meta is not None else made  # an index may gain a file that reads now
        if made[: len(kept)] != kept or (entry is not None and len(made) != entry.images):
            raise UsageError(
                f"{folder} cannot be encoded again: the images it lists under {root} changed "
                f"since it was built ({len(made)} read now, {len(kept)} recorded): restore "
                "them, or rebuild with fol-infer index ... --force"
            )
        replace_folder(fresh, folder)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
