"""Global descriptors in FAISS, inner product (descriptors are unit norm: cosine similarity).

The default ``"Flat"`` is exact (IndexFlatIP); on the CPU it is searched by `exact_flat`, at
BLAS speed with scores that do not depend on the batch. Any FAISS factory string works for
large databases, built with METRIC_INNER_PRODUCT: ``"HNSW32"``, ``"IVF4096,PQ64"``,
``"SQfp16"``, ``"HNSW32,SQfp16"``, ...

Training rule (IVF, PQ, SQ8 ... need it): `add` buffers descriptors in memory until
`train_size` of them have arrived, then trains on all of them and adds them. `train_size`
defaults to 39 x the largest cluster count in the factory (FAISS's own advice), capped at
1 GiB of float32 vectors but never below the cluster count itself. `search` and `save` train
on whatever is buffered when fewer arrived; below the cluster count FAISS cannot train, and
a `UsageError` says so and suggests ``"Flat"``.

With GPU FAISS installed and a GPU present, ``device="auto"`` searches on a GPU copy of the
index (rebuilt after `add`); factories FAISS cannot put on a GPU (HNSW) stay on the CPU.

File format (one file, written atomically: temp + fsync + os.replace):
``b"FOLGIDX1"``, u32 header length, JSON header (schema and toolkit version, factory, dim,
ntotal, search parameters), the FAISS index bytes, u64 length of those bytes, and the sha256
of everything before it. `open` checks the sizes always and the hash unless ``verify="sizes"``
(with ``"cached"``, only when the verification cache cannot vouch for the file).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from fol_infer import __version__
from fol_infer.choices import FaissDevice, VerifyLevel
from fol_infer.errors import BackendUnavailableError, DamagedFileError, IndexStoreError, UsageError
from fol_infer.files.atomic import atomic_writer
from fol_infer.files.integrity import VerificationCache, needs_hash
from fol_infer.index.exact_flat import ExactFlat, is_flat_inner_product
from fol_infer.index.metadata import check_schema, store_error
from fol_infer.model.arch import GLOBAL_DIM

SCHEMA_VERSION = 1
_MAGIC = b"FOLGIDX1"
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_TAIL = _U64.size + 32
_GPU_MAX_K = 2048  # FAISS GPU k-selection limit; larger k searches the CPU index
_TRAIN_BYTES = 1 << 30
_CPU_GROUP = 8  # queries per CPU search of a non-flat index: below FAISS's BLAS (see `search`)
_PARAMS = {"nprobe": "nprobe", "ef_search": "efSearch"}


def _faiss() -> Any:
    import faiss  # imported lazily: loading FAISS costs ~0.2 s and not every command needs it

    return faiss


def gpu_available() -> bool:
    """True when this FAISS build has GPU support and sees at least one GPU."""
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _cluster_count(index: Any) -> int:
    """The most centroids any part of the index trains (IVF lists, PQ codebooks); 1 if none."""
    faiss = _faiss()
    parts = [faiss.downcast_index(index)]
    if hasattr(parts[0], "index"):  # IndexPreTransform (OPQ, PCA ...)
        parts.append(faiss.downcast_index(parts[0].index))
    if hasattr(parts[-1], "storage"):  # HNSW over PQ / SQ storage
        parts.append(faiss.downcast_index(parts[-1].storage))
    try:
        parts.append(faiss.extract_index_ivf(index))
    except RuntimeError:
        pass
    k = 1
    for p in parts:
        k = max(k, int(getattr(p, "nlist", 1)))
        if hasattr(p, "pq"):
            k = max(k, int(p.pq.ksub))
    return k


class GlobalIndex:
    """A FAISS inner-product index over image ids 0..N-1 in the order they were added."""

    def __init__(self, index: Any, factory: str, device: FaissDevice, train_size: int | None):
        self.factory = factory
        self.dim = int(index.d)
        self._index = index
        self._pending: list[np.ndarray] = []
        self._min_train = _cluster_count(index)
        cap = max(self._min_train, _TRAIN_BYTES // (4 * self.dim))
        self.train_size = train_size or min(39 * self._min_train, cap)
        self._params: dict[str, int] = {}
        self._gpu: Any = None
        self._gpu_res: Any = None
        self._exact = ExactFlat(index) if is_flat_inner_product(index) else None
        self.device = _resolve_device(device)

    @classmethod
    def create(
        cls,
        dim: int = GLOBAL_DIM,
        factory: str = "Flat",
        device: FaissDevice = "auto",
        train_size: int | None = None,
    ) -> GlobalIndex:
        faiss = _faiss()
        try:
            index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1]
            raise UsageError(
                f"FAISS cannot build factory {factory!r} for dim {dim}: {reason}"
            ) from None
        return cls(index, factory, device, train_size)

    def __len__(self) -> int:
        return int(self._index.ntotal) + sum(len(p) for p in self._pending)

    @property
    def ntotal(self) -> int:
        return len(self)

    # ----------------------------------------------------------------- build
    def add(self, descriptors: np.ndarray) -> None:
        """Append (B, dim) descriptors; their ids continue from `ntotal`."""
        x = self._check(descriptors, "descriptors")
        self._gpu = None
        if self._index.is_trained and not self._pending:
            self._index.add(x)
            return
        self._pending.append(x)
        if sum(len(p) for p in self._pending) >= self.train_size:
            self._train()

    def _train(self) -> None:
        """Train on everything buffered, then add it (see the training rule in the module doc)."""
        if not self._pending:
            return
        x = np.concatenate(self._pending)
        if len(x) < self._min_train:
            raise UsageError(
                f"the database has {len(x)} descriptors but FAISS factory {self.factory!r} "
                f"needs at least {self._min_train} to train: use factory 'Flat' for it"
            )
        try:
            self._index.train(x)
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1]
            raise UsageError(
                f"FAISS factory {self.factory!r} cannot train on {len(x)} descriptors "
                f"({reason}): use factory 'Flat' or a smaller one"
            ) from None
        self._index.add(x)
        self._pending = []

    @property
    def is_trained(self) -> bool:
        """True once nothing waits in the training buffer (always for Flat and HNSW)."""
        return bool(self._index.is_trained) and not self._pending

    def trained_empty(self) -> GlobalIndex:
        """A copy with this index's training and no vectors: the one quantizer every shard of
        a map adds to, so that their scores are those of a single index."""
        self._train()
        faiss = _faiss()
        copy = faiss.clone_index(self._index)
        copy.reset()
        return GlobalIndex(copy, self.factory, "cpu", self.train_size)

    @property
    def searches_a_graph(self) -> bool:
        """True for graph indexes (HNSW, NSG): each shard's graph finds different neighbours,
        so a sharded map of them is approximate even where a single one would agree."""
        faiss = _faiss()
        index = faiss.downcast_index(self._index)
        if hasattr(index, "index") and not hasattr(index, "nlist"):  # IndexPreTransform
            index = faiss.downcast_index(index.index)
        return type(index).__name__.startswith(("IndexHNSW", "IndexNSG"))

    def _check(self, x: np.ndarray, what: str) -> np.ndarray:
        a = np.ascontiguousarray(x, dtype=np.float32)
        if a.ndim != 2 or a.shape[1] != self.dim:
            raise UsageError(f"{what} have shape {np.shape(x)}, expected (n, {self.dim})")
        if not np.isfinite(a).all():
            raise UsageError(f"{what} hold NaN or infinite values: check the encoder")
        return a

    # ----------------------------------------------------------------- search
    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """IVF `nprobe` (lists visited) and HNSW `ef_search` (queue size): speed vs recall."""
        faiss = _faiss()
        for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            if value is None:
                continue
            if int(value) < 1:
                raise UsageError(f"{name} must be at least 1, got {value}")
            try:
                faiss.ParameterSpace().set_index_parameter(self._index, _PARAMS[name], int(value))
            except RuntimeError:
                raise UsageError(f"FAISS factory {self.factory!r} has no {name} setting") from None
            self._params[name] = int(value)
        self._gpu = None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: (nq, k) float32 scores, descending, and (nq, k) int64 ids
        (-1 where an approximate index finds fewer than k)."""
        q = self._check(queries, "queries")
        self._train()
        n = int(self._index.ntotal)
        if not 1 <= k <= n:
            raise UsageError(f"k = {k} but the index holds {n} images: ask for 1 <= k <= {n}")
        index = self._gpu_index() if k <= _GPU_MAX_K else self._index
        if index is not self._index:
            scores, ids = index.search(q, k)
            return scores, ids.astype(np.int64, copy=False)
        if self._exact is not None:  # BLAS speed, each score a function of query and vector
            return self._exact.search(q, k)
        # FAISS (1.15) computes the products of 16 or more queries blockwise (an IVF's coarse
        # search too), and their rounding depends on the batch: searching in smaller groups
        # makes a query score alike alone or in a batch, in one index or in a map's shards.
        parts = [index.search(q[a : a + _CPU_GROUP], k) for a in range(0, len(q), _CPU_GROUP)]
        scores, ids = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        return scores, ids.astype(np.int64, copy=False)

    def _gpu_index(self) -> Any:
        """The GPU copy when the device is a GPU and FAISS can place this factory there."""
        if self.device != "gpu":
            return self._index
        if self._gpu is None:
            faiss = _faiss()
            if self._gpu_res is None:
                self._gpu_res = faiss.StandardGpuResources()
            try:
                self._gpu = faiss.index_cpu_to_gpu(self._gpu_res, 0, self._index)
            except RuntimeError:
                self.device = "cpu"  # e.g. HNSW: FAISS has no GPU version of it
                return self._index
            for name, value in self._params.items():
                faiss.GpuParameterSpace().set_index_parameter(self._gpu, _PARAMS[name], value)
        return self._gpu

    # ----------------------------------------------------------------- save / open
    def save(self, path: Path | str) -> None:
        """Write atomically (see the module doc); trains first if descriptors are buffered."""
        self._train()
        faiss = _faiss()
        header = json.dumps(
            {
                "format": "fol-infer-global-index",
                "schema_version": SCHEMA_VERSION,
                "toolkit_version": __version__,
                "factory": self.factory,
                "dim": self.dim,
                "ntotal": int(self._index.ntotal),
                "search_params": self._params,
            }
        ).encode()
        try:
            with atomic_writer(path) as f:
                sink = _HashingWriter(f)
                sink.write(_MAGIC + _U32.pack(len(header)) + header)
                start = sink.size
                faiss.write_index(self._index, faiss.PyCallbackIOWriter(sink.write))
                sink.write(_U64.pack(sink.size - start))
                f.write(sink.digest())
        except OSError as exc:
            raise store_error(exc, "saving the global index to", path) from exc

    @classmethod
    def open(
        cls,
        path: Path | str,
        verify: VerifyLevel = "cached",
        device: FaissDevice = "auto",
        repair: str = "rebuild the index",
    ) -> GlobalIndex:
        """Load a saved index; refuse a torn, damaged or other-schema file, naming it. Unless
        `verify` is "sizes", the file is hashed while FAISS reads it (no second read) and
        checked against its footer, except where the verification cache vouches for it
        (`fol_infer.files.integrity`)."""
        faiss = _faiss()
        path = Path(path)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise IndexStoreError(f"{path} is missing: build the index first") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(len(_MAGIC) + _U32.size)
            if len(head) < len(_MAGIC) + _U32.size or head[: len(_MAGIC)] != _MAGIC:
                raise IndexStoreError(f"{path} is not a fol-infer global index: {repair}")
            hlen = _U32.unpack_from(head, len(_MAGIC))[0]
            raw_header = f.read(hlen)
            try:
                header = json.loads(raw_header)
                check_schema(header["schema_version"], SCHEMA_VERSION, path, "global index")
                factory, dim, ntotal = str(header["factory"]), header["dim"], header["ntotal"]
                params = dict(header["search_params"])
            except (ValueError, KeyError, TypeError):
                raise DamagedFileError(path, "its header is unreadable", repair) from None
            f.seek(size - _TAIL)
            tail = f.read(_TAIL) if size >= _TAIL else b""
            payload = _U64.unpack_from(tail)[0] if tail else -1
            if size != len(head) + hlen + payload + _TAIL:
                raise IndexStoreError(
                    f"{path} has {size} bytes, its header and footer say "
                    f"{len(head) + hlen + max(payload, 0) + _TAIL}: the file is torn; {repair}"
                )
            digest = tail[_U64.size :].hex()
            hasher = hashlib.sha256(head + raw_header) if needs_hash(path, digest, verify) else None
            f.seek(len(head) + hlen)
            reader = _bounded_reader(f, payload, hasher)
            try:
                index = faiss.read_index(faiss.PyCallbackIOReader(reader))
            except RuntimeError:
                raise DamagedFileError(path, "FAISS cannot read it", repair) from None
            if hasher is not None:
                while reader(1 << 22):  # whatever FAISS did not need to read
                    pass
                hasher.update(tail[: _U64.size])
                if hasher.hexdigest() != digest:
                    raise DamagedFileError(path, "its sha256 differs from its footer's", repair)
                VerificationCache().remember(path, digest)
        if index.ntotal != ntotal or index.d != dim:
            raise DamagedFileError(path, "it disagrees with its own header", repair)
        out = cls(index, factory, device, None)
        if params:
            out.set_search_params(**params)
        return out

    def close(self) -> None:
        """Release the GPU copy and its resources; safe to call twice."""
        self._gpu = None
        self._gpu_res = None

    def __enter__(self) -> GlobalIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _resolve_device(device: str) -> str:
    if device == "cpu":
        return "cpu"
    if device == "auto":
        return "gpu" if gpu_available() else "cpu"
    if device == "gpu":
        if not gpu_available():
            raise BackendUnavailableError(
                "GPU FAISS was asked for but this FAISS has no GPU support or sees no GPU: "
                "install faiss-gpu-cu12 on a CUDA machine, or use device 'cpu'"
            )
        return "gpu"
    raise UsageError(f"device must be 'auto', 'cpu' or 'gpu', not {device!r}")


class _HashingWriter:
    """A write callback for FAISS that hashes and counts what it passes to the file."""

    def __init__(self, f: IO[bytes]):
        self._f, self._h, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self._f.write(data)
        self._h.update(data)
        self.size += len(data)
        return len(data)

    def digest(self) -> bytes:
        return self._h.digest()


def _bounded_reader(f: IO[bytes], n: int, hasher: Any = None) -> Callable[[int], bytes]:
    """A read callback for FAISS that never reads past the index bytes into the footer, and
    feeds what it reads to `hasher` when one is given."""
    left = [n]

    def read(size: int) -> bytes:
        data = f.read(min(size, left[0]))
        left[0] -= len(data)
        if hasher is not None:
            hasher.update(data)
        return data

    return read
