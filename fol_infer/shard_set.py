"""What the query path sees of a database: a set of shards, searched and scored as one.

A single index is a map of one shard, so `Retriever` has one code path. A global search fans
out to every shard and the top lists are merged exactly (`index.shards.merge_top_k`); each
shard then scores the re-rank candidates whose tokens it holds, and the counts are put back
in candidate order. `LocalShardSet` opens every shard in this process; `RayShardSet`
(`fol_infer.distributed.serve`) serves each shard from its own Ray actor;
`fol_infer.pipeline.open_shard_set` opens either.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fol_infer.bundle import Bundle
from fol_infer.choices import FaissDevice, TokenFormat
from fol_infer.errors import (
    DamagedFileError,
    FolInferError,
    IndexStoreError,
    ShardMismatchError,
    ShardUnavailableError,
    UsageError,
    first_line,
)
from fol_infer.index.database import FAISS_FILE, METADATA, Database
from fol_infer.index.metadata import IndexMetadata, repair_command
from fol_infer.index.shards import MapManifest, ShardEntry, is_map, merge_top_k
from fol_infer.rerank import RerankSettings, count_mutual_matches_certified, score_many

log = logging.getLogger(__name__)
DOWN_RETRY_S = 30.0  # how long a partial answer leaves a failed shard out before trying it again
SHARD_DOWN = (IndexStoreError, DamagedFileError, OSError)  # a shard that cannot be served now
Why = FolInferError | str  # why a shard is down: the error it raised, or what was seen


class Stages(Protocol):
    """A timer with named stages (`pipeline.Timer`)."""

    def stage(self, name: str) -> AbstractContextManager[None]: ...


class _NoTimer:
    def stage(self, name: str) -> AbstractContextManager[None]:
        return nullcontext()


Hits = tuple[np.ndarray, np.ndarray, list[str]]  # scores, global ids, shards that did not answer


class ShardSet(ABC):
    """The shards of a map (or the one index) with their global id ranges."""

    folder: Path
    manifest: MapManifest
    paths: list[str]  # by global id

    @property
    def entries(self) -> list[ShardEntry]:
        return self.manifest.shards

    @property
    def token_format(self) -> TokenFormat:
        return self.manifest.settings.get("tokens", "fp16")

    def __len__(self) -> int:
        return self.manifest.images

    def place_paths(self, i: int, paths: list[str]) -> None:
        """Shard `i`'s image paths, at its global ids (a down shard's stay unknown: "")."""
        entry = self.entries[i]
        self.paths[entry.offset : entry.offset + entry.images] = paths

    def absolute_path(self, db_index: int) -> Path:
        """An image's file: its recorded path under the database root."""
        return Path(self.manifest.root) / self.paths[db_index]

    @abstractmethod
    def search(self, descriptors: np.ndarray, k: int, allow_partial: bool = False) -> Hits:
        """Global top-k of each (nq, dim) descriptor over all shards, merged exactly."""

    @abstractmethod
    def score(
        self,
        queries: list[np.ndarray],
        candidates: list[np.ndarray],
        rerank: RerankSettings,
        timer: Stages,
        allow_partial: bool = False,
    ) -> tuple[list[np.ndarray], list[str]]:
        """Match counts of each query's candidates (global ids), -1 where a shard did not
        answer, and the names of those shards."""

    @abstractmethod
    def close(self) -> None: ...

    closed = False

    def check_open(self) -> None:
        """Refuse any use after `close` (a closed set would otherwise answer nothing)."""
        if self.closed:
            raise UsageError(f"the shard set of {self.folder} is closed: open it again")

    def __enter__(self) -> ShardSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_manifest(folder: Path, bundle: Bundle | None) -> MapManifest:
    """The manifest of a complete map, or one describing a single index as a map of one."""
    if is_map(folder):
        manifest = MapManifest.load(folder)
        manifest.require_complete(folder)
        manifest.check_consistent(folder)
        if bundle is not None:
            manifest.check_bundle(bundle.manifest.fingerprint, str(bundle.folder))
        return manifest
    if not (folder / METADATA).is_file():
        Database(folder)  # raises the single index's own explanation
    meta = IndexMetadata.load(folder / METADATA)
    entry = ShardEntry(folder.name, len(meta.paths), "", "", len(meta.paths), 0)
    manifest = MapManifest(meta.root, meta.bundle_sha256, meta.bundle_name, meta.settings, [entry])
    manifest.complete = True
    return manifest


def recorded_bundle(folder: str | Path) -> Path:
    """The bundle folder an index or a map was built with, as it records it."""
    return Path(read_manifest(Path(folder), None).bundle_name)


def indexed_paths(folder: Path) -> tuple[list[str], Path]:
    """Every image's recorded path by global id, and the database root, of a complete map or
    an index: from its metadata alone (no FAISS index or token store is opened)."""
    manifest = read_manifest(folder, None)
    if not is_map(folder):
        return IndexMetadata.load(folder / METADATA).paths, Path(manifest.root)
    paths = [
        p for e in manifest.shards for p in IndexMetadata.load(folder / e.name / METADATA).paths
    ]
    return paths, Path(manifest.root)


def open_shard(
    folder: Path,
    manifest: MapManifest,
    entry: ShardEntry,
    bundle: Bundle | None,
    device: FaissDevice,
) -> Database:
    """Open one shard, checking what it records of itself against the manifest: a shard
    that is missing or damaged raises `IndexStoreError` (or `DamagedFileError`), one that
    holds other data than map.json says raises `ShardMismatchError`; each names the shard."""
    if not is_map(folder):
        return Database(folder, bundle=bundle, device=device)
    path = folder / entry.name
    where = f"{entry.describe()} of map {folder}"
    if not (path / METADATA).is_file() or not (path / FAISS_FILE).is_file():
        raise IndexStoreError(
            f"{where}: {path} is missing or incomplete: restore it, or rebuild it: "
            f"{repair_command(path)}"
        )
    try:
        meta = IndexMetadata.load(path / METADATA, repair_command(path))
    except IndexStoreError as exc:
        raise IndexStoreError(f"{where}: {exc}") from None
    problem = entry.mismatch(meta, manifest.root)
    if problem is None and meta.settings.get("tokens") != manifest.settings["tokens"]:
        problem = f"its tokens are {meta.settings.get('tokens')}, the map's are "
        problem += str(manifest.settings["tokens"])
    if problem is None and meta.bundle_sha256 != manifest.bundle_sha256:
        problem = "it was built by another bundle than the map"
    if problem is not None:
        raise ShardMismatchError(
            f"{where}: {path} does not hold what map.json records ({problem}): was a shard "
            f"folder replaced or map.json edited? Rebuild the map: "
            f"{manifest.rebuild_command(folder)}"
        )
    try:
        return Database(path, bundle=bundle, device=device, meta=meta)
    except IndexStoreError as exc:
        raise IndexStoreError(f"{where}: {exc}") from None


def local_ids(entry: ShardEntry, candidates: list[np.ndarray]) -> list[np.ndarray]:
    """Per query, a mask of the candidates (global ids) that this shard holds."""
    return [(c >= entry.offset) & (c < entry.offset + entry.images) for c in candidates]


@dataclass
class ShardScoring:
    """One shard's part of a score call: the queries with candidates there (`active`), their
    tokens, those candidates' local ids, and each query's mask of them (to put counts back)."""

    active: list[int]
    queries: list[np.ndarray]
    local: list[np.ndarray]
    masks: list[np.ndarray]


def split_scoring(
    entries: list[ShardEntry], queries: list[np.ndarray], candidates: list[np.ndarray]
) -> list[ShardScoring | None]:
    """Each shard's part (None for a shard that holds no candidate), in entry order."""
    parts: list[ShardScoring | None] = []
    for entry in entries:
        masks = local_ids(entry, candidates)
        active = [q for q, m in enumerate(masks) if m.any()]
        local = [candidates[q][masks[q]] - entry.offset for q in active]
        parts.append(
            ShardScoring(active, [queries[q] for q in active], local, masks) if active else None
        )
    return parts


def gather_counts(
    candidates: list[np.ndarray],
    parts: list[ShardScoring | None],
    answers: Sequence[list[np.ndarray] | None],
) -> list[np.ndarray]:
    """The shards' counts in candidate order; -1 where a shard gave no answer."""
    counts = [np.full(len(c), -1, np.int64) for c in candidates]
    for part, got in zip(parts, answers):
        if part is None or got is None:
            continue
        for q, c in zip(part.active, got):
            counts[q][part.masks[q]] = c
    return counts


Answer = tuple[np.ndarray, np.ndarray] | None  # one shard's scores and local ids


def search_shard(database: Database, descriptors: np.ndarray, k: int) -> Answer:
    """One shard's top min(k, size); None for a shard without images."""
    if not len(database):
        return None
    return database.global_index.search(descriptors, min(k, len(database)))


def score_shard(
    database: Database,
    queries: Sequence[np.ndarray],
    candidates: Sequence[np.ndarray],
    rerank: RerankSettings,
    timer: Stages | None = None,
    bundle: Bundle | None = None,
) -> list[np.ndarray]:
    """Match counts of each query's candidates (this shard's local ids). An int8-exact shard
    is scored from its int8 tokens, reading float32 rows only where the int8 error bound leaves
    a decision open (those reads count as re-ranking time). ``bundle``: where the onnx and trt
    re-rankers find rerank.onnx and its engine."""
    timer = timer or _NoTimer()
    store, exact = database.tokens, database.exact_tokens
    with timer.stage("fetch"):
        wanted = np.unique(np.concatenate(candidates))
        tokens = store.get_quantized(wanted) if exact is not None else store.get(wanted)
        fetched: dict[int, Any] = dict(zip(wanted.tolist(), tokens))
    with timer.stage("rerank"):
        lists = [[fetched[int(i)] for i in cand] for cand in candidates]
        if exact is None:
            return score_many(list(queries), lists, rerank, bundle)

        def originals(q: int, k: int, rows: np.ndarray) -> np.ndarray:
            return exact.get_rows(int(candidates[q][k]), rows)

        certified = count_mutual_matches_certified(
            list(queries),
            lists,
            originals,
            rerank.threshold,
            block_bytes=rerank.block_bytes,
            workers=rerank.workers,
        )
        return [c.scores for c in certified]


def merge_searches(
    entries: list[ShardEntry], answers: list[Answer], k: int, nq: int
) -> tuple[np.ndarray, np.ndarray]:
    """Shard answers (`search_shard`, in entry order) -> merged global top-k."""
    parts = []
    for entry, answer in zip(entries, answers):
        if answer is not None:
            scores, local = answer
            parts.append((scores, np.where(local >= 0, local + entry.offset, -1)))
    if len(parts) == 1 and parts[0][0].shape[1] == k:
        return parts[0]  # one shard: FAISS's own order, nothing to merge
    return merge_top_k(parts, k, nq)


class ShardHealth:
    """Which shards of a map are down, why, and since when. A query that needs the whole map
    tries every down shard again (and fails naming it); a partial one (``allow_partial``)
    leaves a shard out for `retry_s` after it failed, so that a map with a dead shard
    answers at full speed instead of waiting for that shard on every query."""

    def __init__(self, folder: Path, entries: list[ShardEntry], retry_s: float = DOWN_RETRY_S):
        self.folder, self.entries, self.retry_s = folder, entries, retry_s
        self._down: dict[int, tuple[Why, float]] = {}  # shard -> (why, when it last failed)
        self._lock = threading.Lock()

    @property
    def down(self) -> list[int]:
        with self._lock:
            return sorted(self._down)

    def mark_down(self, i: int, why: Why) -> None:
        """Shard `i` failed: an error of this toolkit (which names the shard and its repair),
        or a reason (no answer in time, a process that died)."""
        with self._lock:
            if i not in self._down:
                log.debug("map %s: %s is down: %s", self.folder, self.entries[i].name, why)
            self._down[i] = (why, time.monotonic())

    def mark_up(self, i: int) -> None:
        with self._lock:
            self._down.pop(i, None)

    def worth_trying(self, i: int, allow_partial: bool) -> bool:
        """Whether a query should try shard `i` now (always, unless it is down and a partial
        answer may leave it out a while longer)."""
        with self._lock:
            if i not in self._down or not allow_partial:
                return True
            return time.monotonic() - self._down[i][1] >= self.retry_s

    def check(self, needed: Sequence[int], allow_partial: bool) -> list[str]:
        """The names of the `needed` shards that are down; without ``allow_partial``, the
        error of the first of them instead (its own, where it had one)."""
        with self._lock:
            down = [i for i in needed if i in self._down]
            if down and not allow_partial:
                entry, why = self.entries[down[0]], self._down[down[0]][0]
                if isinstance(why, FolInferError):
                    raise why
                raise ShardUnavailableError(
                    f"{entry.describe()} of map {self.folder} is down: {why}; bring it "
                    "back or query with --allow-partial"
                )
        return [self.entries[i].name for i in down]


class LocalShardSet(ShardSet):
    """Every shard opened in this process (memory maps shared by all query threads). A shard
    of a map that cannot be opened (missing, damaged) is down (`ShardHealth`); one that
    holds other data than map.json says is refused."""

    def __init__(self, folder: Path, bundle: Bundle | None, device: FaissDevice) -> None:
        self.folder = Path(os.path.abspath(folder))
        self.bundle, self.device = bundle, device
        self.manifest = read_manifest(self.folder, bundle)
        self.health = ShardHealth(self.folder, self.entries)
        self.databases: list[Database | None] = [None] * len(self.entries)
        self.paths = [""] * self.manifest.images  # by global id; a down shard's stay unknown
        self._reopen = threading.Lock()
        try:
            for i in range(len(self.entries)):
                self._open(i)
        except BaseException:
            self.close()
            raise

    def _open(self, i: int) -> None:
        """Open shard `i` (a single index: raise on failure; a map's shard: mark it down)."""
        entry = self.entries[i]
        try:
            database = open_shard(self.folder, self.manifest, entry, self.bundle, self.device)
        except ShardMismatchError:
            raise
        except SHARD_DOWN as exc:
            if not is_map(self.folder):
                raise
            self.health.mark_down(i, exc if isinstance(exc, FolInferError) else first_line(exc))
            return
        self.databases[i] = database
        self.place_paths(i, database.paths)
        self.health.mark_up(i)

    def _revive(self, allow_partial: bool) -> None:
        """Try the down shards a query should try again (`ShardHealth.worth_trying`)."""
        for i in self.health.down:
            if self.health.worth_trying(i, allow_partial):
                with self._reopen:
                    if self.databases[i] is None:
                        self._open(i)

    def search(self, descriptors: np.ndarray, k: int, allow_partial: bool = False) -> Hits:
        self.check_open()
        self._revive(allow_partial)
        databases = list(self.databases)
        missing = self.health.check(
            [i for i, db in enumerate(databases) if db is None], allow_partial
        )
        answers = [None if db is None else search_shard(db, descriptors, k) for db in databases]
        return (*merge_searches(self.entries, answers, k, len(descriptors)), missing)

    def score(
        self,
        queries: list[np.ndarray],
        candidates: list[np.ndarray],
        rerank: RerankSettings,
        timer: Stages,
        allow_partial: bool = False,
    ) -> tuple[list[np.ndarray], list[str]]:
        self.check_open()
        parts = split_scoring(self.entries, queries, candidates)
        databases = list(self.databases)
        needed = [i for i, p in enumerate(parts) if p is not None and databases[i] is None]
        missing = self.health.check(needed, allow_partial)
        answers = [
            None
            if part is None or database is None
            else score_shard(database, part.queries, part.local, rerank, timer, self.bundle)
            for part, database in zip(parts, databases)
        ]
        counts = gather_counts(candidates, parts, answers)
        return counts, missing

    def close(self) -> None:
        self.closed = True
        for database in self.databases:
            if database is not None:
                database.close()
        self.databases = [None] * len(self.databases)
