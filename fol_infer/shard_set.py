"""What the query path sees of a database: a set of shards, searched and scored as one.

A single index is a map of one shard, so `Retriever` has one code path. A global search fans
out to every shard and the top lists are merged exactly (`index.shards.merge_top_k`); each
shard then scores the re-rank candidates whose tokens it holds, and the counts are put back
in candidate order. `LocalShardSet` opens every shard in this process; `ShardSet.ray` serves
each shard from its own Ray actor (`fol_infer.distributed`, imported only then).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fol_infer.bundle import Bundle
from fol_infer.choices import FaissDevice, TokenFormat
from fol_infer.errors import IndexStoreError
from fol_infer.index.database import FAISS_FILE, METADATA, Database
from fol_infer.index.metadata import IndexMetadata
from fol_infer.index.shards import MapManifest, ShardEntry, is_map, merge_top_k
from fol_infer.rerank import RerankSettings, count_mutual_matches_certified, score_many


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
        return self.manifest.settings.get("tokens", "fp16")  # type: ignore[no-any-return]

    def __len__(self) -> int:
        return self.manifest.images

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

    def __enter__(self) -> ShardSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def open(
        folder: str | Path, bundle: Bundle | None = None, device: FaissDevice = "auto"
    ) -> LocalShardSet:
        """Every shard of a map (or the one index) opened in this process."""
        return LocalShardSet(Path(folder), bundle, device)

    @staticmethod
    def ray(
        folder: str | Path,
        bundle: Bundle | None = None,
        address: str = "auto",
        timeout_s: float = 30.0,
        **actor_options: Any,
    ) -> ShardSet:
        """One Ray actor per shard, each opening its own shard (needs ``fol-infer[ray]``),
        queried through a Ray compiled graph; `RayShardSet`'s settings (``search_threads``,
        ``compiled``, ``start_timeout_s``) and Ray actor options go through ``actor_options``."""
        from fol_infer.distributed.serve import RayShardSet

        return RayShardSet(Path(folder), bundle, address, timeout_s, **actor_options)


def read_manifest(folder: Path, bundle: Bundle | None) -> MapManifest:
    """The manifest of a complete map, or one describing a single index as a map of one."""
    if is_map(folder):
        manifest = MapManifest.load(folder)
        manifest.require_complete(folder)
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
    """Open one shard, checking it against the manifest; errors name the shard and its ids."""
    if not is_map(folder):
        return Database(folder, bundle=bundle, device=device)
    path = folder / entry.name
    try:
        if not (path / METADATA).is_file() or not (path / FAISS_FILE).is_file():
            raise IndexStoreError(f"{path} is missing or incomplete")
        database = Database(path, bundle=bundle, device=device)
        if len(database) != entry.images or database.token_format != manifest.settings["tokens"]:
            database.close()
            raise IndexStoreError(f"{path} does not hold what map.json records")
        database.meta.check_bundle(manifest.bundle_sha256, manifest.bundle_name)
    except IndexStoreError as exc:
        raise IndexStoreError(f"{entry.describe()} of map {folder}: {exc}") from None
    return database


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


class LocalShardSet(ShardSet):
    """Every shard opened in this process (memory maps shared by all query threads)."""

    def __init__(self, folder: Path, bundle: Bundle | None, device: FaissDevice) -> None:
        self.folder = folder
        self.bundle = bundle
        self.manifest = read_manifest(folder, bundle)
        self.databases: list[Database] = []
        try:
            for entry in self.entries:
                self.databases.append(open_shard(folder, self.manifest, entry, bundle, device))
        except BaseException:
            self.close()
            raise
        self.paths = [p for db in self.databases for p in db.paths]

    def search(self, descriptors: np.ndarray, k: int, allow_partial: bool = False) -> Hits:
        answers = [search_shard(db, descriptors, k) for db in self.databases]
        return (*merge_searches(self.entries, answers, k, len(descriptors)), [])

    def score(
        self,
        queries: list[np.ndarray],
        candidates: list[np.ndarray],
        rerank: RerankSettings,
        timer: Stages,
        allow_partial: bool = False,
    ) -> tuple[list[np.ndarray], list[str]]:
        parts = split_scoring(self.entries, queries, candidates)
        answers = [
            None
            if part is None
            else score_shard(database, part.queries, part.local, rerank, timer, self.bundle)
            for part, database in zip(parts, self.databases)
        ]
        counts = gather_counts(candidates, parts, answers)
        return counts, []

    def close(self) -> None:
        for database in self.databases:
            database.close()
        self.databases = []
