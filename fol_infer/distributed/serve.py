"""A map served by Ray actors: one actor per shard, each opening its own shard's memory maps.

Only query descriptors, query tokens, candidate ids, scores and counts travel; a memory map
never does. Fan-outs go through a Ray Compiled Graph over the shard actors: one `execute` over
shared-memory channels instead of one actor call per shard (less than half the transport,
`benchmarks/ray_shards.py`). When the graph fails (an actor died, or no answer within
`timeout_s`), it is torn down on a thread and the fan-out is made again by actor calls: a shard
that fails or stays silent is tried once more on a fresh actor, then raises
`ShardUnavailableError` naming it and its ids (or, with ``allow_partial``, is left out and
listed in the answer). A hung shard thus costs up to two timeouts. Once every shard answers
again, the graph is compiled again on a thread; queries go by actor calls meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fol_infer.bundle import Bundle
from fol_infer.distributed import connect, require_ray
from fol_infer.errors import FolInferError, ShardMismatchError, UsageError, first_line
from fol_infer.index.shards import MapManifest, ShardEntry
from fol_infer.rerank import RerankSettings
from fol_infer.shard_set import (
    SHARD_DOWN,
    Answer,
    Hits,
    ShardHealth,
    ShardSet,
    Stages,
    Why,
    gather_counts,
    merge_searches,
    open_shard,
    read_manifest,
    score_shard,
    search_shard,
    split_scoring,
)

log = logging.getLogger(__name__)
GRAPH_SETUP_TIMEOUT_S = 120.0  # a compiled graph's first execution, on a loaded cluster


class _QuietTeardown(logging.Filter):
    """Ray's own log of a graph's teardown is dropped: line by line at every close, and with
    tracebacks about the shards that failed, which `RayShardSet._drop_graph` names once."""

    NOISE = (
        "Tearing down compiled DAG",
        "Cancelling compiled worker",
        "Error cancelling worker task",
        "Waiting for worker tasks",
        "Teardown complete",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


logging.getLogger("ray.dag.compiled_dag_node").addFilter(_QuietTeardown())
Request = tuple[str, tuple[Any, ...]] | None  # (ShardServer method, its args); None: idle


class ShardServer:
    """What runs inside a shard's actor. `threads`: FAISS's OpenMP threads, one by default:
    a node runs several shard actors, and one OpenMP team per actor would oversubscribe its
    cores (raise it for a node that serves one large Flat shard). A shard that cannot be
    opened (missing, damaged, or holding other data than map.json says) keeps its actor up
    to give that error to every call: the caller then knows why, and leaves a missing shard
    out of partial answers but never serves a mismatched one."""

    def __init__(
        self, folder: str, manifest: MapManifest, entry: ShardEntry, threads: int = 1
    ) -> None:
        import faiss

        faiss.omp_set_num_threads(threads)
        self.refusal: Exception | None = None
        try:
            self.database = open_shard(Path(folder), manifest, entry, None, "auto")
        except SHARD_DOWN as exc:  # ShardMismatchError included
            self.refusal = exc

    def paths(self) -> list[str]:
        return self.database.paths

    def search(self, descriptors: np.ndarray, k: int) -> Answer:
        return search_shard(self.database, descriptors, k)

    def score(
        self, queries: list[np.ndarray], local: list[np.ndarray], rerank: RerankSettings
    ) -> list[np.ndarray]:
        return score_shard(self.database, queries, local, rerank)

    def serve(self, request: Request) -> tuple[Any, float]:
        """Every call's one entry point (so that searches and scoring share one compiled
        graph): the method's result and the seconds this shard spent on it."""
        if request is None:
            return None, 0.0
        if self.refusal is not None:
            raise self.refusal
        start = time.perf_counter()
        method, args = request
        return getattr(self, method)(*args), time.perf_counter() - start


@dataclass(frozen=True)
class FanOut:
    """The last fan-out: its wall time, the time the busiest shard spent on its own part
    (the rest is transport: channels or actor calls, serialisation, waiting for a core),
    and whether it went through the compiled graph."""

    wall_s: float
    busiest_shard_s: float
    compiled: bool


class RayShardSet(ShardSet):
    """`ShardSet` over Ray actors (see module doc). ``timeout_s``: how long a shard may take to
    answer; ``start_timeout_s`` is added when its actor has to start first (a process, its
    imports, opening the shard). ``compiled=False`` keeps to one actor call per shard (a Ray
    client, or a cluster whose Ray lacks compiled graphs). `actor_options` go to each actor:
    by default it takes no CPU and actors are spread over the nodes (a CPU-less actor would
    otherwise stay on the driver's node); every node must see the map at the same path. A
    shard that is down is handled by `ShardHealth`, as in process; fan-outs from several
    threads take turns (a compiled graph runs one execution at a time)."""

    def __init__(
        self,
        folder: Path,
        bundle: Bundle | None,
        address: str = "auto",
        timeout_s: float = 30.0,
        search_threads: int = 1,
        compiled: bool = True,
        start_timeout_s: float = 60.0,
        **actor_options: Any,
    ) -> None:
        for name, seconds in (("timeout_s", timeout_s), ("start_timeout_s", start_timeout_s)):
            if not 0 < seconds < math.inf:  # NaN fails it too
                raise UsageError(f"{name} must be a positive number of seconds, got {seconds}")
        self._ray = require_ray()
        self.search_threads = search_threads
        self.folder = Path(os.path.abspath(folder))  # the actors' working folder is not ours
        self.timeout_s, self.start_timeout_s = timeout_s, start_timeout_s
        self.manifest = read_manifest(self.folder, bundle)
        self.health = ShardHealth(self.folder, self.entries)
        self.owns_cluster = connect(address)
        options = {"num_cpus": 0, "scheduling_strategy": "SPREAD"} | actor_options
        self._actor_class = self._ray.remote(ShardServer).options(**options)
        self._actors: list[Any] = [None] * len(self.entries)
        self._actors_lock = threading.Lock()
        self._graph: Any = None
        self._graph_work = threading.Thread()  # compiling the graph, or a failed one's teardown
        self._graph_failed = False
        self._fan_out_lock = threading.Lock()
        self.compiled = compiled
        self.paths = [""] * self.manifest.images  # by global id; a down shard's stay unknown
        try:
            self._fan_out("paths", [() for _ in self.entries], True)
            self._start_graph(wait=True)
        except BaseException:
            self.close()
            raise

    def _actor(self, i: int) -> Any:
        with self._actors_lock:  # the graph may be compiled on another thread
            if self._actors[i] is None:
                entry = self.entries[i]
                self._actors[i] = self._actor_class.remote(
                    str(self.folder), self.manifest, entry, self.search_threads
                )
            return self._actors[i]

    def _start_graph(self, wait: bool) -> None:
        """Compile the graph on a thread (queries meanwhile go by actor calls); ``wait``: at
        open, so that the first query finds it ready."""
        if self.health.down or not self.compiled:
            return
        if self._graph is not None or self._graph_work.is_alive():
            return
        self._graph_work = threading.Thread(
            target=self._compile, name="fol-map-compile", daemon=True
        )
        self._graph_work.start()
        if wait:
            self._graph_work.join()

    def _compile(self) -> None:
        """Compile the graph over every shard's actor and run it once: a graph's first
        execution sets its channels up, which takes seconds, and must not fall on a query."""
        graph = None
        try:
            from ray.dag import InputNode, MultiOutputNode

            actors = [self._actor(i) for i in range(len(self.entries))]
            with InputNode() as requests:
                outputs = [a.serve.bind(requests[i]) for i, a in enumerate(actors)]
                graph = MultiOutputNode(outputs).experimental_compile(
                    _submit_timeout=self.timeout_s
                )
            self._ray.get(graph.execute(*[None] * len(actors)), timeout=GRAPH_SETUP_TIMEOUT_S)
            self._graph = graph
        except Exception as exc:  # e.g. a Ray client connection: actor calls still work
            if graph is not None:  # compiled but its first run failed: free its channels
                with contextlib.suppress(Exception):
                    graph.teardown()
            if self._graph_failed:  # not the first try: a shard went down meanwhile
                log.debug("map %s: compiling the graph again failed: %s", self.folder, exc)
                return
            self.compiled = False
            log.warning(
                "map %s: no Ray compiled graph (%s); shards answer by one actor call each",
                self.folder,
                first_line(exc),
            )

    def _drop_graph(self, reason: str) -> None:
        """Detach a failed graph and tear it down on a thread: a shard that hangs holds the
        teardown until the actor-call fan-out gives up on it and kills it. The actors that
        answer are kept (Ray's ``kill_actors`` would kill them all)."""
        log.warning(
            "map %s: compiled graph stopped (%s); shards answer by actor calls until every "
            "one answers again",
            self.folder,
            reason,
        )
        graph, self._graph = self._graph, None
        self._graph_failed = True
        self._graph_work = threading.Thread(
            target=graph.teardown, name="fol-map-teardown", daemon=True
        )
        self._graph_work.start()

    def _graph_fan_out(self, method: str, args: list[tuple[Any, ...] | None]) -> list[Any] | None:
        """One `execute` of the compiled graph; None when there is no graph or it failed."""
        if self._graph is None:
            return None
        ray = self._ray
        try:
            refs = self._graph.execute(*[None if a is None else (method, a) for a in args])
            return list(ray.get(refs, timeout=self.timeout_s))
        except ray.exceptions.RayTaskError as exc:  # raised by our code: the graph stays up
            if isinstance(exc.cause, FolInferError):
                raise exc.cause from None
            raise
        except ray.exceptions.RayChannelTimeoutError:
            self._drop_graph(f"no answer within {self.timeout_s:g} s")
        except ray.exceptions.RayError as exc:  # an actor died, a channel broke
            self._drop_graph(first_line(exc))
        return None

    def _fan_out(
        self, method: str, args: list[tuple[Any, ...] | None], allow_partial: bool
    ) -> tuple[list[Any], list[str]]:
        """Call `method` on every shard whose args are not None, in parallel: through the
        compiled graph, else one actor call per shard (`_calls_fan_out`). One fan-out at a
        time: the graph's channels carry one execution, and a retry replaces actors."""
        self.check_open()
        with self._fan_out_lock:
            start = time.perf_counter()
            answers = self._graph_fan_out(method, args)
            compiled = answers is not None
            if answers is None:
                answers, missing = self._calls_fan_out(method, args, allow_partial)
            else:
                missing = []
            results = [None if a is None else a[0] for a in answers]
            busy = max((a[1] for a in answers if a is not None), default=0.0)
            self.last_fan_out = FanOut(time.perf_counter() - start, busy, compiled)
        return results, missing

    def _calls_fan_out(
        self, method: str, args: list[tuple[Any, ...] | None], allow_partial: bool
    ) -> tuple[list[Any], list[str]]:
        """One actor call per shard, with one retry on a fresh actor for the shards that
        failed or gave no answer in time; a shard down a short while is not waited for by a
        partial answer (`ShardHealth`)."""
        results: list[Any] = [None] * len(args)
        needed = [i for i, a in enumerate(args) if a is not None]
        todo = [i for i in needed if self.health.worth_trying(i, allow_partial)]
        reasons: dict[int, Why] = {}
        for _attempt in range(2):
            if not todo:
                break
            starting = any(self._actors[i] is None for i in todo)
            timeout = self.timeout_s + (self.start_timeout_s if starting else 0.0)
            refs = {i: self._actor(i).serve.remote((method, args[i])) for i in todo}
            ready, _ = self._ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
            ready_set = set(ready)
            failed = []
            for i, ref in refs.items():
                if ref not in ready_set:
                    reasons[i] = f"no answer within {timeout:g} s"
                    failed.append(i)
                    continue
                try:
                    results[i] = self._ray.get(ref)
                except self._ray.exceptions.RayTaskError as exc:
                    cause = exc.cause
                    if isinstance(cause, ShardMismatchError) or not isinstance(cause, SHARD_DOWN):
                        if isinstance(cause, FolInferError):
                            raise cause from None
                        raise
                    reasons[i] = cause if isinstance(cause, FolInferError) else first_line(cause)
                    failed.append(i)
                except self._ray.exceptions.RayActorError as exc:
                    reasons[i] = first_line(exc)
                    failed.append(i)
            for i in failed:  # start afresh on the retry
                self._ray.kill(self._actors[i], no_restart=True)
                self._actors[i] = None
            todo = failed
        for i in needed:
            if results[i] is not None:
                self.health.mark_up(i)
            elif i in reasons:
                why = reasons[i]
                self.health.mark_down(
                    i, why if isinstance(why, FolInferError) else f"{why} (tried twice)"
                )
        missing = self.health.check(needed, allow_partial)
        if method == "paths":
            for i in needed:
                if results[i] is not None:
                    self.place_paths(i, results[i][0])
        elif not self.health.down:
            self._start_graph(wait=False)  # every shard answers again: back to the graph
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
        with timer.stage("rerank"):
            parts = split_scoring(self.entries, queries, candidates)
            args = [None if p is None else (p.queries, p.local, rerank) for p in parts]
            answers, missing = self._fan_out("score", args, allow_partial)
            counts = gather_counts(candidates, parts, answers)
        return counts, missing

    def close(self) -> None:
        self.closed = True
        self.compiled = False  # no new graph from here on
        if self._graph is not None and not self._graph_work.is_alive():
            self._graph.teardown()
            self._graph = None
        for actor in self._actors:
            if actor is not None:
                self._ray.kill(actor, no_restart=True)
        if self._graph_work.is_alive():  # compiling or tearing down: over once actors are gone
            self._graph_work.join(GRAPH_SETUP_TIMEOUT_S)
        if self._graph is not None:  # compiled on the thread meanwhile
            self._graph.teardown()
            self._graph = None
        self._actors = [None] * len(self._actors)
        if self.owns_cluster and self._ray.is_initialized():
            self._ray.shutdown()
            self.owns_cluster = False
