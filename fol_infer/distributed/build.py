"""Shard builds as Ray tasks: one task per shard, retried when its worker dies.

A retried task resumes its shard from the shard's last commit (`run_shard_job`), so a worker
killed at any point costs at most one batch and stores no image twice. Plan far more shards
than workers: a retry then redoes little, and the last shards do not leave workers idle.
Every worker must see the map folder and the database at the same paths (a shared file system).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from fol_infer.backends.base import Encoder
from fol_infer.distributed import connect, require_ray
from fol_infer.errors import FolInferError, first_line
from fol_infer.index.map_build import ShardJob, run_shard_job
from fol_infer.progress import Advance

EncoderKey = tuple[str, str, int | None, str | None]  # bundle, backend, threads, checkpoint
_ENCODERS: dict[EncoderKey, Encoder] = {}  # one per worker process


def _encoder(key: EncoderKey) -> Encoder:
    """The worker's encoder, opened once and kept for its next tasks."""
    from fol_infer.backends import open_encoder
    from fol_infer.bundle import Bundle

    if key not in _ENCODERS:
        bundle, backend, threads, checkpoint = key
        _ENCODERS[key] = open_encoder(Bundle.open(bundle), backend, checkpoint, threads)
    return _ENCODERS[key]


def _build_task(job: ShardJob, key: EncoderKey, on_batch: Advance | None) -> tuple[str, int]:
    encoder = _encoder(key) if job.files else None
    return job.folder, run_shard_job(job, encoder, on_batch)


class RayRunner:
    """Runs shard jobs as Ray tasks on the cluster at `address` (see module doc).

    `cpus` per task (also the encoder's threads), one GPU per task where the cluster has
    GPUs, `decode_threads` per task. `on_batch(images, total)` runs in the worker after each
    committed batch.
    """

    def __init__(
        self,
        address: str = "auto",
        backend: str = "onnx",
        cpus: int = 1,
        decode_threads: int = 2,
        retries: int = 3,
        on_batch: Advance | None = None,
        checkpoint: str | Path | None = None,
    ) -> None:
        self.ray = require_ray()
        self.owns_cluster = connect(address)
        self.backend, self.cpus, self.retries, self.on_batch = backend, cpus, retries, on_batch
        self.decode_threads = decode_threads
        self.checkpoint = None if checkpoint is None else os.path.abspath(checkpoint)
        self.gpus = 1 if self.ray.cluster_resources().get("GPU", 0) > 0 else 0

    def run(self, jobs: Sequence[ShardJob], progress: Advance | None) -> None:
        ray = self.ray
        task = ray.remote(_build_task).options(
            num_cpus=self.cpus, num_gpus=self.gpus, max_retries=self.retries
        )
        total = sum(len(j.files) for j in jobs)
        pending: dict[Any, ShardJob] = {}
        for job in jobs:
            job = replace(job, decode_threads=self.decode_threads)
            key = (job.bundle, self.backend, self.cpus, self.checkpoint)
            pending[task.remote(job, key, self.on_batch)] = job
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(done[0])
                self._get(done[0], job)
                if progress:
                    progress(len(job.files), total)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    def _get(self, ref: Any, job: ShardJob) -> None:
        ray = self.ray
        try:
            ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, FolInferError):
                raise exc.cause from None
            raise FolInferError(f"building {job.folder} failed on Ray: {exc.cause!r}") from None
        except ray.exceptions.RayError as exc:
            raise FolInferError(
                f"building {job.folder} failed on Ray after {self.retries} retries "
                f"({first_line(exc)}); "
                "re-run the command: finished shards are kept"
            ) from None

    def close(self) -> None:
        if self.owns_cluster:
            self.ray.shutdown()
