"""A map served by Ray actors: one actor per shard, each opening its own shard's memory maps.

Only query descriptors, query tokens (put in the object store once per batch), candidate ids,
scores and counts travel; a memory map never does. A call that fails or takes longer than
`timeout_s` is tried once more on a fresh actor (a killed actor is started again there, on
whichever node can open its shard); a shard that fails twice raises `ShardUnavailableError`
naming it and its ids, or, with ``allow_partial``, is left out and listed in the answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fol_infer.bundle import Bundle
from fol_infer.distributed import connect, require_ray
from fol_infer.errors import FolInferError, ShardUnavailableError
from fol_infer.index.shards import MapManifest, ShardEntry
from fol_infer.rerank import RerankSettings
from fol_infer.shard_set import (
    Answer,
    Hits,
    ShardSet,
    Stages,
    local_ids,
    merge_searches,
    open_shard,
    read_manifest,
    score_shard,
    search_shard,
)


class ShardServer:
    """What runs inside a shard's actor. `threads`: FAISS's OpenMP threads, one by default:
    a node runs several shard actors, and one OpenMP team per actor would oversubscribe its
    cores (raise it for a node that serves one large Flat shard)."""

    def __init__(
        self, folder: str, manifest: MapManifest, entry: ShardEntry, threads: int = 1
    ) -> None:
        import faiss

        faiss.omp_set_num_threads(threads)
        self.database = open_shard(Path(folder), manifest, entry, None, "auto")

    def paths(self) -> list[str]:
        return self.database.paths

    def search(self, descriptors: np.ndarray, k: int) -> Answer:
        return search_shard(self.database, descriptors, k)

    def score(
        self,
        queries: list[np.ndarray],
        active: list[int],
        local: list[np.ndarray],
        rerank: RerankSettings,
    ) -> list[np.ndarray]:
        return score_shard(self.database, [queries[q] for q in active], local, rerank)


class RayShardSet(ShardSet):
    """`ShardSet` over Ray actors (see module doc); `actor_options` go to each actor
    (e.g. ``num_cpus``, or ``resources`` to pin a shard to the node whose disk holds it)."""

    def __init__(
        self,
        folder: Path,
        bundle: Bundle | None,
        address: str = "auto",
        timeout_s: float = 30.0,
        search_threads: int = 1,
        **actor_options: Any,
    ) -> None:
        self._ray = require_ray()
        self.search_threads = search_threads
        self.folder, self.timeout_s = folder, timeout_s
        self.manifest = read_manifest(folder, bundle)
        self.owns_cluster = connect(address)
        options = {"num_cpus": 0} | actor_options
        self._actor_class = self._ray.remote(ShardServer).options(**options)
        self._actors: list[Any] = [None] * len(self.entries)
        try:
            shard_paths = self._fan_out("paths", [() for _ in self.entries], False)[0]
        except BaseException:
            self.close()
            raise
        self.paths = [p for paths in shard_paths for p in paths]

    def _actor(self, i: int) -> Any:
        if self._actors[i] is None:
            entry = self.entries[i]
            self._actors[i] = self._actor_class.remote(
                str(self.folder), self.manifest, entry, self.search_threads
            )
        return self._actors[i]

    def _fan_out(
        self, method: str, args: list[tuple[Any, ...] | None], allow_partial: bool
    ) -> tuple[list[Any], list[str]]:
        """Call `method` on every shard whose args are not None, in parallel; one retry on a
        fresh actor for the shards that failed or timed out."""
        results: list[Any] = [None] * len(args)
        todo = [i for i, a in enumerate(args) if a is not None]
        reasons: dict[int, str] = {}
        for _attempt in range(2):
            if not todo:
                break
            refs = {i: getattr(self._actor(i), method).remote(*args[i]) for i in todo}  # type: ignore[misc]
            ready, _ = self._ray.wait(
                list(refs.values()), num_returns=len(refs), timeout=self.timeout_s
            )
            ready_set = set(ready)
            failed = []
            for i, ref in refs.items():
                if ref not in ready_set:
                    reasons[i] = f"no answer within {self.timeout_s:g} s"
                    failed.append(i)
                    continue
                try:
                    results[i] = self._ray.get(ref)
                except self._ray.exceptions.RayTaskError as exc:
                    if isinstance(exc.cause, FolInferError):
                        raise exc.cause from None
                    raise
                except self._ray.exceptions.RayActorError as exc:
                    reasons[i] = _first_line(exc)
                    failed.append(i)
            for i in failed:  # start afresh on the retry
                self._ray.kill(self._actors[i], no_restart=True)
                self._actors[i] = None
            todo = failed
        missing = [self.entries[i].name for i in todo]
        if todo and not allow_partial:
            i = todo[0]
            raise ShardUnavailableError(
                f"{self.entries[i].describe()} of map {self.folder} is down: {reasons[i]} "
                "(tried twice); bring it back or query with --allow-partial"
            )
        return results, missing

    def search(self, descriptors: np.ndarray, k: int, allow_partial: bool = False) -> Hits:
        x = np.ascontiguousarray(descriptors, np.float32)
        args = [(x, k) if e.images else None for e in self.entries]
        answers, missing = self._fan_out("search", args, allow_partial)
        return (*merge_searches(self.entries, answers, k, len(x)), missing)

    def score(
        self,
        queries: list[np.ndarray],
        candidates: list[np.ndarray],
        rerank: RerankSettings,
        timer: Stages,
        allow_partial: bool = False,
    ) -> tuple[list[np.ndarray], list[str]]:
        counts = [np.full(len(c), -1, np.int64) for c in candidates]
        with timer.stage("rerank"):
            queries_ref = self._ray.put(queries)
            masks = [local_ids(e, candidates) for e in self.entries]
            args: list[tuple[Any, ...] | None] = []
            for entry, mask in zip(self.entries, masks):
                active = [q for q, m in enumerate(mask) if m.any()]
                local = [candidates[q][mask[q]] - entry.offset for q in active]
                args.append((queries_ref, active, local, rerank) if active else None)
            answers, missing = self._fan_out("score", args, allow_partial)
            for mask, arg, got in zip(masks, args, answers):
                if arg is None or got is None:
                    continue
                for q, c in zip(arg[1], got):
                    counts[q][mask[q]] = c
        return counts, missing

    def close(self) -> None:
        for actor in self._actors:
            if actor is not None:
                self._ray.kill(actor, no_restart=True)
        self._actors = [None] * len(self._actors)
        if self.owns_cluster and self._ray.is_initialized():
            self._ray.shutdown()
            self.owns_cluster = False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
