"""Building an index folder (layout: `fol_infer.index.database`): from a folder of images, by
appending to it, or as a map's shard.

Commit order per batch: descriptors, tokens (int8 then float32), then ``index.json``, whose
image count is the commit point. After a crash, or while a writer is between commits, the
stores may hold a batch more than the metadata: a writer resuming cuts them back to it. A new
build writes ``index.json`` (incomplete, no image) before its first store, so a folder it was
killed in is recognised as its own; it is marked incomplete until its last batch, so an
interrupted build is never served, and re-running the same command resumes it (from scratch
while no image is committed). ``--force`` builds in ``<index>.rebuild``, which the same
command resumes, and swaps it in at the end. Appending keeps the index servable after every
batch. Every write happens under the index's writer lock (`fol_infer.index.lock`); `--force`
replaces only an index (`fol_infer.files.ownership`); a build that fails before its first
commit leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fol_infer.backends.base import Encoder
from fol_infer.bundle import Bundle
from fol_infer.choices import IndexMode, TokenFormat
from fol_infer.errors import UsageError
from fol_infer.files.atomic import holds_only_leftovers, remove_leftovers, replace_folder
from fol_infer.files.ownership import check_replaceable, occupied
from fol_infer.images import find_images
from fol_infer.index.database import (
    DESCRIPTORS,
    EXACT_TOKENS,
    FAISS_FILE,
    METADATA,
    PRODUCT,
    REBUILD_SUFFIX,
    TOKENS,
    extend,
    faiss_from_descriptors,
    is_index,
    open_stores,
    stores_match,
    token_layout,
)
from fol_infer.index.global_index import GlobalIndex
from fol_infer.index.lock import WriterLock
from fol_infer.index.metadata import IndexMetadata, repair_command
from fol_infer.index.token_store import TokenStore
from fol_infer.loader import iter_batches
from fol_infer.progress import Advance


@dataclass
class BuildSettings:
    factory: str = "Flat"
    tokens: TokenFormat = TokenFormat.FP16
    batch: int = 8

    def __post_init__(self) -> None:
        self.tokens = TokenFormat.parse(self.tokens, "token format")

    def to_dict(self) -> dict[str, object]:
        return {"factory": self.factory, "tokens": str(self.tokens), "batch": self.batch}

    def check_same(self, recorded: Mapping[str, object], folder: Path) -> None:
        """Refuse to extend or resume an index or map built with other settings (the batch
        may differ: it changes no stored byte's meaning)."""
        for key, value in self.to_dict().items():
            if key != "batch" and recorded.get(key) != value:
                raise UsageError(
                    f"{folder} was built with {key}={recorded.get(key)!r}, not {value!r}: "
                    "use the same settings, or --force to rebuild"
                )


@dataclass
class BuildReport:
    folder: Path
    added: int
    total: int
    failures: list[tuple[str, str]] = field(default_factory=list)
    resumed_from: int = 0
    seconds: float = 0.0
    retried: list[str] = field(default_factory=list)  # failed before, changed since

    @property
    def images_per_second(self) -> float:
        return self.added / self.seconds if self.seconds else 0.0


def build_index(
    bundle: Bundle,
    encoder: Encoder,
    db_folder: str | Path,
    out: str | Path,
    settings: BuildSettings | None = None,
    mode: IndexMode = "new",
    progress: Advance | None = None,
    wait: bool = False,
    notice: Callable[[str], None] | None = None,
) -> BuildReport:
    """Encode every image under `db_folder` into the index at `out` (see module doc), holding
    the index's writer lock throughout (`wait`: wait for another writer instead of refusing)."""
    settings = settings or BuildSettings()
    out, root = Path(os.path.abspath(out)), Path(db_folder).resolve()
    files = find_images([root])
    if not files:
        raise UsageError(f"no images found under {db_folder} (looked for jpg, png, ...)")
    with WriterLock(out, wait=wait, notice=notice):
        inputs = {"database folder": root, "bundle": bundle.folder}
        work = _output_folder(out, mode, inputs, bundle, settings, root)
        existed = work.exists()
        meta, stores = _open_or_create(work, bundle, root, settings)
        try:
            report = _encode_all(encoder, bundle, files, work, meta, stores, settings, progress)
        except BaseException:
            if not meta.paths:  # nothing committed: leave no half-made index behind
                _discard(work, existed)
            raise
        finally:
            for store in stores:
                store.close()
        if work != out:
            replace_folder(work, out)
    report.folder = out
    return report


def encode_into(
    bundle: Bundle,
    encoder: Encoder,
    root: Path,
    files: Sequence[Path],
    work: Path,
    settings: BuildSettings,
    progress: Advance | None = None,
    decode_threads: int = 2,
) -> BuildReport:
    """Encode the `files` (under `root`) not yet in the index folder `work` (a map's shard),
    creating or resuming it, one commit per batch, under its writer lock; the FAISS file and
    the complete mark are `seal_index`'s."""
    with WriterLock(work):
        meta, stores = _open_or_create(work, bundle, root, settings)
        try:
            return _encode_all(
                encoder, bundle, list(files), work, meta, stores, settings, progress,
                decode_threads, seal=False,
            )  # fmt: skip
        finally:
            for store in stores:
                store.close()


def seal_index(work: Path, empty: GlobalIndex | None = None) -> None:
    """Add the folder's descriptors to `empty` (an already trained FAISS index holding no
    vectors; default: a new one of the recorded factory), save it as the folder's FAISS file
    and mark the index complete, under its writer lock."""
    with WriterLock(work):
        meta = IndexMetadata.load(work / METADATA)
        repair = repair_command(work)
        descriptors = TokenStore.open(work / DESCRIPTORS, verify="cached", repair=repair)
        try:
            stores_match(meta, [descriptors], True)
            if empty is None:
                empty = GlobalIndex.create(descriptors.dim, meta.settings["factory"], "cpu")
            extend(empty, descriptors, 0)
            empty.save(work / FAISS_FILE)
        finally:
            descriptors.close()
        meta.settings["complete"] = True
        meta.save(work / METADATA)


def _output_folder(
    out: Path,
    mode: IndexMode,
    inputs: dict[str, Path],
    bundle: Bundle,
    settings: BuildSettings,
    root: Path,
) -> Path:
    """The folder to write into (a sibling for --force), after refusing what the mode may
    not touch (`fol_infer.files.ownership`)."""
    if mode == "append":
        if not is_index(out):
            raise UsageError(f"--append: {out} is not an index yet; build it first")
        return out
    if mode == "force":
        check_replaceable(out, PRODUCT, inputs)
        work = out.with_name(out.name + REBUILD_SUFFIX)
        check_replaceable(work, PRODUCT, inputs)  # an interrupted --force's, or nothing
        if not work.exists() and not out.exists():
            return out
        if not _same_build(work, bundle, settings, root):
            shutil.rmtree(work, ignore_errors=True)
        return work  # resumed, or begun afresh; swapped in when complete
    if is_index(out):
        if IndexMetadata.load(out / METADATA).settings.get("complete", False):
            raise UsageError(
                f"{out} already holds an index: pass --append to add images or --force to rebuild"
            )
        return out  # an interrupted build: resume it
    if out.exists() and (not out.is_dir() or not holds_only_leftovers(out)):
        raise UsageError(occupied(out, PRODUCT))
    return out


def _same_build(work: Path, bundle: Bundle, settings: BuildSettings, root: Path) -> bool:
    """Whether `work` is an index begun from this database by this bundle with these
    settings (an interrupted --force of the same command, which resumes it)."""
    if not is_index(work):
        return False
    try:
        meta = IndexMetadata.load(work / METADATA)
        meta.check_bundle(bundle.manifest.fingerprint)
        settings.check_same(meta.settings, work)
    except UsageError:  # IndexStoreError included
        return False
    return meta.root == str(root)


def _open_or_create(
    work: Path, bundle: Bundle, root: Path, settings: BuildSettings
) -> tuple[IndexMetadata, list[TokenStore]]:
    """The metadata and stores (descriptors first) of an index to extend, or of a new one.
    ``index.json`` comes first, so a build killed while it makes its stores left a folder
    that says it is an index with nothing committed: its stores are made again. What killed
    writes left in the folder is swept first (the caller holds the writer lock)."""
    for folder in (work, *(work / name for name in (DESCRIPTORS, TOKENS, EXACT_TOKENS))):
        remove_leftovers(folder)
    if is_index(work):
        meta = IndexMetadata.load(work / METADATA)
        meta.check_bundle(bundle.manifest.fingerprint, str(bundle.folder))
        settings.check_same(meta.settings, work)
        if not meta.paths and not meta.settings.get("complete", False):
            return meta, _fresh_stores(work, bundle, settings)
        return meta, open_stores(work, settings.tokens, meta, "cached", writer=True)
    work.mkdir(parents=True, exist_ok=True)
    meta = IndexMetadata(
        root=str(root),
        bundle_sha256=bundle.manifest.fingerprint,
        bundle_name=str(bundle.folder),
        settings=settings.to_dict() | {"resolution": list(bundle.resolution), "complete": False},
    )
    meta.save(work / METADATA)
    return meta, _fresh_stores(work, bundle, settings)


def _fresh_stores(work: Path, bundle: Bundle, settings: BuildSettings) -> list[TokenStore]:
    """Empty stores (descriptors first) in place of whatever an earlier build of this
    uncommitted index left of them; widths as the bundle's graphs were exported."""
    manifest = bundle.manifest
    layout = [(DESCRIPTORS, "fp32", manifest.descriptor_dim)]
    layout += [(name, dtype, manifest.token_dim) for name, dtype in token_layout(settings.tokens)]
    stores: list[TokenStore] = []
    try:
        for name, dtype, dim in layout:
            TokenStore.remove(work / name)
            stores.append(TokenStore.create(work / name, dtype=dtype, dim=dim))  # type: ignore[arg-type]
    except BaseException:
        for store in stores:
            store.close()
        raise
    return stores


def _to_encode(files: list[Path], meta: IndexMetadata, report: BuildReport) -> list[Path]:
    """Files not indexed yet: new ones, and recorded failures whose file changed since."""
    known = set(meta.paths)
    failed = {name for name, _ in meta.failures}
    todo = []
    for f in (f.resolve() for f in files):
        name = meta.name_of(f)
        if name in known:
            continue
        if name in failed:
            if _stamp(f) == meta.failure_stamps.get(name):
                continue
            meta.forget_failure(name)
            report.retried.append(name)
        todo.append(f)
    return todo


def _stamp(path: Path | str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _encode_all(
    encoder: Encoder,
    bundle: Bundle,
    files: list[Path],
    work: Path,
    meta: IndexMetadata,
    stores: list[TokenStore],
    settings: BuildSettings,
    progress: Advance | None,
    decode_threads: int = 2,
    seal: bool = True,
) -> BuildReport:
    """Encode and commit batch by batch, then (with `seal`) write global.faiss and mark the
    build complete."""
    descriptors, *token_stores = stores
    report = BuildReport(folder=work, added=0, total=len(meta.paths), resumed_from=len(meta.paths))
    todo = _to_encode(files, meta, report)  # names stay relative to the first build's root
    start = time.perf_counter()
    for batch in iter_batches(todo, bundle.resolution, settings.batch, workers=decode_threads):
        failures = [(meta.name_of(f.source), f.reason) for f in batch.failures]
        if batch.indices:
            result = encoder.encode(batch.images)
            descriptors.append([d[None] for d in result.descriptors])
            token_lists = result.token_list()
            for store in token_stores:
                store.append(token_lists)
            meta.add_images([todo[i] for i in batch.indices])
        meta.failures.extend(failures)
        for f, (name, _) in zip(batch.failures, failures):
            stamp = _stamp(f.source)
            if stamp is not None:
                meta.failure_stamps[name] = stamp
        meta.save(work / METADATA)  # the commit point
        report.added += len(batch.indices)
        report.failures.extend(failures)
        if progress:
            progress(len(batch.indices) + len(failures), len(todo))
    if seal:
        if not meta.paths:
            raise UsageError(f"none of the {len(files)} image files could be read")
        faiss_from_descriptors(descriptors, settings.factory, "cpu").save(work / FAISS_FILE)
        meta.settings["complete"] = True
        meta.save(work / METADATA)
    report.total = len(meta.paths)
    report.seconds = time.perf_counter() - start
    return report


def _discard(work: Path, existed: bool) -> None:
    """Remove what a build that committed nothing wrote: the folder if it made it, else only
    the index's own entries (a user's empty folder stays)."""
    if not existed:
        shutil.rmtree(work, ignore_errors=True)
        return
    for name in (DESCRIPTORS, TOKENS, EXACT_TOKENS):
        TokenStore.remove(work / name)
    for name in (METADATA, FAISS_FILE):
        (work / name).unlink(missing_ok=True)
