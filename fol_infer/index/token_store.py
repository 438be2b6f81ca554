"""Re-ranking tokens on disk: append-only, memory-mapped, true counts only.

The published code keeps every image as 3600 x 128 float32 (1.76 MiB, zero padded). This store
keeps each image's real rows only, as float16 (default), int8 with a float32 scale per token
(scale = max|x| / 127, symmetric), or float32. A query reads just its candidates' rows through
np.memmap, so a store far larger than memory serves queries.

A store is a folder:

- ``tokens.bin``   rows of all images, back to back (dtype per the store)
- ``scales.bin``   int8 stores only: one float32 scale per row
- ``ends.bin``     int64 per image: cumulative row count after that image
- ``segments.bin`` one 32-byte record per commit: image end, row end, and the crc32 of the
                   bytes that commit added to tokens.bin, scales.bin and ends.bin
- ``commit.json``  the commit record: schema and toolkit version, dtype, dim, committed image,
                   row and segment counts, and the running crc32 of segments.bin

Crash-safety protocol. `commit.json` is the only thing that makes data visible: a reader uses
exactly the prefix of each file that it names and ignores anything past it. `append` (1)
truncates every file to its committed size (dropping a torn tail a crash left behind), (2)
appends the new rows, ends and segment record, (3) fsyncs them, and (4) writes the new commit
record to a temporary file, fsyncs it and `os.replace`s it over `commit.json`. A crash (kill -9,
power loss) before (4) leaves the previous commit in force; after it, the new one. A failed
write (disk full) leaves the store at its last commit and raises `IndexStoreError`.

Every `append` call is one commit: callers choose the batch size (a few hundred images makes
the fsyncs negligible). One writer at a time: `append` takes an exclusive advisory lock on
``.lock`` (held until `close`) and first catches up with commits made by others since this
object opened. Reads need no lock and are thread-safe, also while the same object appends
(readers see the commit current when their `get` starts). `truncate(n)` commits a shorter
prefix ending at a commit boundary, so that a database whose files (metadata, descriptors,
tokens) are committed one after another can bring them back to a common point after a crash.

`dim` is free: with dim=8448, one row per image and dtype "fp32", a store is also a crash-safe,
append-only home for global descriptors, from which a FAISS index can be rebuilt or extended.

`open(..., verify="sizes")` checks that every file holds its committed bytes, the segment
list's crc and that ends are consistent; ``"cached"`` (the default) also checks the crc32 of
``ends.bin`` (8 bytes per image); ``"full"`` re-hashes every segment of every file. Rows are
too large to hash at open: every read checks that the rows it returns are finite and names
the image and file otherwise (`repair` says what rebuilds the store).
"""

from __future__ import annotations

import glob
import os
import shutil
import struct
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from fol_infer import __version__
from fol_infer.choices import StoreDtype, VerifyLevel
from fol_infer.errors import DamagedFileError, IndexStoreError, UsageError
from fol_infer.files.atomic import fsync_dir
from fol_infer.files.integrity import all_finite, check_level
from fol_infer.index.metadata import check_schema, read_json, store_error, write_json_atomic
from fol_infer.model.arch import TOKEN_DIM

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory lock, single writer by convention
    fcntl = None  # type: ignore[assignment]

SCHEMA_VERSION = 1
FORMAT = "fol-infer-token-store"
TOKENS, SCALES, ENDS, SEGMENTS, COMMIT, LOCK = (
    "tokens.bin",
    "scales.bin",
    "ends.bin",
    "segments.bin",
    "commit.json",
    ".lock",
)
_SEGMENT = struct.Struct("<qqIII4x")  # image end, row end, crc tokens, crc scales, crc ends
_STORED: dict[str, np.dtype] = {
    "fp32": np.dtype(np.float32),
    "fp16": np.dtype(np.float16),
    "int8": np.dtype(np.int8),
}
_CHUNK = 64 << 20


def _write(f: IO[bytes], data: bytes) -> None:
    """The one place bytes reach a data file (tests make it fail like a full disk)."""
    f.write(data)


def quantize_int8(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: q = round(x / s), s = max|x| / 127 (all-zero rows: s = 0)."""
    scale = (np.abs(rows).max(axis=1, initial=0.0) / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(rows / safe[:, None]), -127, 127).astype(np.int8)
    return q, scale


class _View:
    """One commit's read-only picture; swapped whole so readers never see a half update."""

    def __init__(self, root: Path, stored: np.dtype, dim: int, ends: np.ndarray, scaled: bool):
        self.ends = ends
        rows = int(ends[-1]) if len(ends) else 0
        self.tokens = np.memmap(root / TOKENS, stored, "r", shape=(rows, dim)) if rows else None
        self.scales = (
            np.memmap(root / SCALES, np.float32, "r", shape=(rows,)) if rows and scaled else None
        )


class TokenStore:
    """Variable-length token lists per image id, on disk (see the module doc for the format)."""

    def __init__(self, path: Path, record: dict[str, Any], ends: np.ndarray, repair: str):
        self.path = path
        self.repair = repair
        self.dtype: StoreDtype = record["dtype"]
        self.dim = int(record["dim"])
        self.toolkit_version = str(record["toolkit_version"])
        self._record = record
        self._stored = _STORED[self.dtype]
        self._scaled = self.dtype == "int8"
        self._write_lock = threading.Lock()
        self._lock_file: IO[bytes] | None = None
        self._view: _View | None = _View(path, self._stored, self.dim, ends, self._scaled)

    # ----------------------------------------------------------------- create / open
    @classmethod
    def create(
        cls, path: Path | str, dtype: StoreDtype = "fp16", dim: int = TOKEN_DIM
    ) -> TokenStore:
        """Make an empty store; built in a temporary folder and renamed, so it appears whole."""
        path = Path(path)
        if dtype not in _STORED:
            raise UsageError(f"token dtype {dtype!r} is not one of {sorted(_STORED)}")
        if path.exists():
            raise IndexStoreError(f"{path} already exists: open it, or remove it to start over")
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed create of this pid
        try:
            tmp.mkdir(parents=True)
            for name in (TOKENS, SCALES, ENDS, SEGMENTS, LOCK):
                if name != SCALES or dtype == "int8":
                    (tmp / name).touch()
            write_json_atomic(tmp / COMMIT, _record(dtype, dim, 0, 0, 0, 0), "creating")
            os.rename(tmp, path)
        except OSError as exc:
            raise store_error(exc, "creating the token store", path) from exc
        fsync_dir(path.parent)
        return cls.open(path)

    @staticmethod
    def remove(path: Path | str) -> None:
        """Delete the store at `path` and what killed `create` calls left beside it (their
        temporary folders), so that a store can be made there again."""
        path = Path(path)
        for leftover in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        shutil.rmtree(path, ignore_errors=True)

    @classmethod
    def open(
        cls, path: Path | str, verify: VerifyLevel = "cached", repair: str = "rebuild the store"
    ) -> TokenStore:
        """Open the last commit; refuse a store that is damaged or of another schema."""
        path = Path(path)
        check_level(verify)
        rec = read_json(path / COMMIT, "token store", repair)
        if rec.get("format") != FORMAT:
            raise IndexStoreError(f"{path / COMMIT} is not a token store record; repair: {repair}")
        check_schema(rec.get("schema_version"), SCHEMA_VERSION, path, "token store")
        if rec.get("dtype") not in _STORED:
            raise IndexStoreError(
                f"{path / COMMIT} names unknown dtype {rec.get('dtype')!r}; repair: {repair}"
            )
        sizes = _sizes(rec)
        for name, size in sizes.items():
            have = os.path.getsize(path / name) if (path / name).exists() else -1
            if have < size:
                raise IndexStoreError(
                    f"{path / name} has {max(have, 0)} bytes but the commit record says "
                    f"{size}: the token store is damaged; repair: {repair}"
                )
        segments = _read(path / SEGMENTS, sizes[SEGMENTS])
        if zlib.crc32(segments) != rec["segments_crc32"]:
            raise DamagedFileError(path / SEGMENTS, "it fails its checksum", repair)
        ends = np.frombuffer(_read(path / ENDS, sizes[ENDS]), np.int64).copy()
        last = _SEGMENT.unpack_from(segments, len(segments) - _SEGMENT.size) if segments else (0, 0)
        if (last[0], last[1]) != (rec["images"], rec["tokens"]) or (
            len(ends) and (ends[-1] != rec["tokens"] or np.any(np.diff(ends, prepend=0) < 0))
        ):
            raise DamagedFileError(path / ENDS, f"it disagrees with {COMMIT}", repair)
        if verify != "sizes":
            _verify_segments(path, rec, segments, repair, ends_only=verify == "cached")
        return cls(path, rec, ends, repair)

    # ----------------------------------------------------------------- write
    def append(self, token_lists: Sequence[np.ndarray]) -> range:
        """Store one (n_i, dim) array per image (n_i may be 0) and commit; return their ids."""
        arrays = [self._check(i, t) for i, t in enumerate(token_lists)]
        with self._write_lock:
            if not arrays:
                return range(len(self), len(self))
            view = self._begin_write()
            n0, t0 = int(self._record["images"]), int(self._record["tokens"])
            rows = np.concatenate(arrays)
            ends = t0 + np.cumsum([len(a) for a in arrays], dtype=np.int64)
            if self._scaled:
                q, scale = quantize_int8(rows)
                chunks = {TOKENS: q.tobytes(), SCALES: scale.tobytes()}
            else:
                chunks = {TOKENS: rows.astype(self._stored).tobytes()}
            chunks[ENDS] = ends.tobytes()
            seg = _SEGMENT.pack(
                n0 + len(arrays),
                int(ends[-1]),
                zlib.crc32(chunks[TOKENS]),
                zlib.crc32(chunks.get(SCALES, b"")),
                zlib.crc32(chunks[ENDS]),
            )
            chunks[SEGMENTS] = seg
            committed = _sizes(self._record)
            rec = _record(
                self.dtype,
                self.dim,
                n0 + len(arrays),
                int(ends[-1]),
                int(self._record["segments"]) + 1,
                zlib.crc32(seg, self._record["segments_crc32"]),
            )
            try:
                for name, data in chunks.items():
                    with open(self.path / name, "r+b") as f:
                        f.truncate(committed[name])
                        f.seek(committed[name])
                        _write(f, data)
                        f.flush()
                        os.fsync(f.fileno())
                write_json_atomic(self.path / COMMIT, rec, "committing to")
            except OSError as exc:
                self._drop_tail(committed)
                raise store_error(exc, "appending to", self.path) from exc
            except IndexStoreError:
                self._drop_tail(committed)
                raise
            self._record = rec
            self._view = _View(
                self.path, self._stored, self.dim, np.concatenate([view.ends, ends]), self._scaled
            )
            return range(n0, n0 + len(arrays))

    def _check(self, i: int, t: np.ndarray) -> np.ndarray:
        a = np.asarray(t)
        if a.ndim != 2 or a.shape[1] != self.dim:
            raise UsageError(f"token list {i} has shape {a.shape}, expected (n, {self.dim})")
        a = a.astype(np.float32, copy=False)
        if not np.isfinite(a).all():
            raise UsageError(f"token list {i} holds NaN or infinite values: check the encoder")
        return a

    def truncate(self, n_images: int) -> None:
        """Commit the first `n_images` only, to resume a build whose other files (metadata,
        descriptors) stopped at an earlier batch. `n_images` must end a commit (an `append`
        call), because checksums cover whole commits. Readers of this store in other processes
        must be closed first: the next append cuts the files."""
        with self._write_lock:
            view = self._begin_write()
            n = len(view.ends)
            if n_images == n:
                return
            segments = _read(self.path / SEGMENTS, _sizes(self._record)[SEGMENTS])
            bounds = [0] + [seg[0] for seg in _SEGMENT.iter_unpack(segments)]
            if not 0 <= n_images <= n:
                raise UsageError(f"cannot truncate {self.path} to {n_images} images: it holds {n}")
            if n_images not in bounds:
                lower = max(b for b in bounds if b < n_images)
                upper = min(b for b in bounds if b > n_images)
                raise UsageError(
                    f"cannot truncate {self.path} to {n_images} images: commits end at {lower} "
                    f"and {upper}; pick one of those"
                )
            k = bounds.index(n_images)
            ends = view.ends[:n_images]
            rec = _record(
                self.dtype,
                self.dim,
                n_images,
                int(ends[-1]) if n_images else 0,
                k,
                zlib.crc32(segments[: k * _SEGMENT.size]),
            )
            write_json_atomic(self.path / COMMIT, rec, "truncating")
            self._record = rec
            self._view = _View(self.path, self._stored, self.dim, ends.copy(), self._scaled)

    def _begin_write(self) -> _View:
        """Take the writer lock and catch up with commits made since this object opened (by
        another object or process), so that a write never cuts committed data."""
        self._live()
        self._take_process_lock()
        if read_json(self.path / COMMIT, "token store") != self._record:
            fresh = TokenStore.open(self.path, repair=self.repair)
            self._record, self._view = fresh._record, fresh._view
        return self._live()

    def _take_process_lock(self) -> None:
        if self._lock_file is not None or fcntl is None:
            return
        f = open(self.path / LOCK, "a+b")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise IndexStoreError(
                f"another writer is appending to {self.path}: wait for it to finish "
                "(one writer at a time, per process and per TokenStore object)"
            ) from None
        self._lock_file = f

    def _drop_tail(self, committed: dict[str, int]) -> None:
        """Best effort after a failed append; the next append truncates again anyway."""
        for name, size in committed.items():
            try:
                with open(self.path / name, "r+b") as f:
                    f.truncate(size)
            except OSError:
                pass

    # ----------------------------------------------------------------- read
    def get(self, ids: Sequence[int] | np.ndarray) -> list[np.ndarray]:
        """Each id's tokens as a (n_i, dim) array of `read_dtype`, reading only those rows."""
        view = self._live()
        out_dtype, out = self.read_dtype, []
        for i, (s, e) in zip(ids, self._spans(view, ids)):
            if e == s or view.tokens is None:
                out.append(np.zeros((0, self.dim), out_dtype))
                continue
            if view.scales is not None:
                scale = self._finite(np.asarray(view.scales[s:e]), int(i), SCALES)[:, None]
                rows = np.multiply(view.tokens[s:e], scale, dtype=np.float32)
            else:
                rows = np.array(view.tokens[s:e])
            out.append(self._finite(rows, int(i), TOKENS))
        return out

    def get_quantized(self, ids: Sequence[int] | np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each id's stored (int8 codes (n_i, dim), float32 scales (n_i,)), as the certified
        re-ranker reads them (it bounds the de-quantisation error from the scales)."""
        view = self._live()
        if self.dtype != "int8":
            raise UsageError(f"{self.path} stores {self.dtype} tokens, not int8")
        out = []
        for i, (s, e) in zip(ids, self._spans(view, ids)):
            if e == s or view.tokens is None or view.scales is None:
                out.append((np.zeros((0, self.dim), np.int8), np.zeros(0, np.float32)))
            else:
                scales = self._finite(np.array(view.scales[s:e]), int(i), SCALES)
                out.append((np.array(view.tokens[s:e]), scales))
        return out

    def get_rows(self, image_id: int, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (indices within the image) of one image, reading only their pages."""
        view = self._live()
        ((s, e),) = self._spans(view, [image_id])
        rows = np.asarray(rows, np.intp)
        if rows.size and (rows.min() < 0 or rows.max() >= e - s):
            raise IndexError(f"rows {rows.min()}..{rows.max()} of image {image_id}: it has {e - s}")
        if view.tokens is None or rows.size == 0:
            return np.zeros((0, self.dim), self.read_dtype)
        picked = view.tokens[s + rows]
        if view.scales is not None:
            scales = self._finite(np.asarray(view.scales[s + rows]), image_id, SCALES)
            picked = np.multiply(picked, scales[:, None], dtype=np.float32)
        return self._finite(np.asarray(picked, self.read_dtype), image_id, TOKENS)

    def _finite(self, rows: np.ndarray, image_id: int, name: str) -> np.ndarray:
        """`rows`, refused when damaged bytes made them NaN or infinite (never served)."""
        if not all_finite(rows):
            detail = f"image {int(image_id)}'s rows hold NaN or infinite values"
            raise DamagedFileError(self.path / name, detail, self.repair)
        return rows

    def limit(self, n_images: int) -> None:
        """Serve only the first `n_images` (a reader's view of a store whose writer committed
        more than the index metadata yet); writes nothing, unlike `truncate`."""
        with self._write_lock:
            view = self._live()
            if not 0 <= n_images <= len(view.ends):
                raise UsageError(f"cannot limit {self.path} to {n_images} images: it holds fewer")
            if n_images < len(view.ends):
                ends = view.ends[:n_images].copy()
                self._view = _View(self.path, self._stored, self.dim, ends, self._scaled)

    def _spans(self, view: _View, ids: Sequence[int] | np.ndarray) -> list[tuple[int, int]]:
        """(first row, end row) of each image id; IndexError names an id out of range."""
        n, out = len(view.ends), []
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise IndexError(f"token store id {i} out of range: the store holds {n} images")
            out.append(((int(view.ends[i - 1]) if i else 0), int(view.ends[i])))
        return out

    @property
    def read_dtype(self) -> np.dtype:
        """float16 for an fp16 store (a plain copy), float32 otherwise. int8 rows are
        de-quantised to float32, not float16: the re-ranker up-casts to float32 anyway (spec
        section 7) and numpy's float32 -> float16 conversion costs ~8x the de-quantisation."""
        return np.dtype(np.float16) if self.dtype == "fp16" else np.dtype(np.float32)

    @property
    def counts(self) -> np.ndarray:
        """(N,) int64 true token count per image."""
        return np.diff(self._live().ends, prepend=0)

    def __len__(self) -> int:
        return len(self._live().ends)

    @property
    def bytes_per_image(self) -> float:
        """Committed bytes on disk (all data files) divided by the number of images."""
        n = len(self)
        return sum(_sizes(self._record).values()) / n if n else 0.0

    def _live(self) -> _View:
        view = self._view
        if view is None:
            raise IndexStoreError(f"token store {self.path} is closed")
        return view

    def close(self) -> None:
        """Drop the memory maps (get() hands out copies, so nothing else holds them) and the
        writer lock; safe to call twice."""
        with self._write_lock:
            self._view = None
            if self._lock_file is not None:
                self._lock_file.close()
                self._lock_file = None

    def __enter__(self) -> TokenStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------- helpers
def _record(dtype: str, dim: int, images: int, tokens: int, segments: int, crc: int) -> dict:
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "toolkit_version": __version__,
        "dtype": dtype,
        "dim": dim,
        "images": images,
        "tokens": tokens,
        "segments": segments,
        "segments_crc32": crc,
    }


def _sizes(rec: dict[str, Any]) -> dict[str, int]:
    """Committed byte length of each data file."""
    stored, rows = _STORED[rec["dtype"]], int(rec["tokens"])
    sizes = {TOKENS: rows * int(rec["dim"]) * stored.itemsize}
    if rec["dtype"] == "int8":
        sizes[SCALES] = rows * 4
    sizes[ENDS] = int(rec["images"]) * 8
    sizes[SEGMENTS] = int(rec["segments"]) * _SEGMENT.size
    return sizes


def _read(path: Path, size: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


def _crc_range(f: IO[bytes], start: int, stop: int) -> int:
    f.seek(start)
    crc, left = 0, stop - start
    while left:
        block = f.read(min(left, _CHUNK))
        if not block:
            break
        crc, left = zlib.crc32(block, crc), left - len(block)
    return crc


def _verify_segments(
    path: Path, rec: dict[str, Any], segments: bytes, repair: str, ends_only: bool
) -> None:
    """Re-hash every committed segment of every data file (of ends.bin only with
    `ends_only`); name the first that differs."""
    # (file, crc slot in the segment record, count slot it is sized by, bytes per unit)
    files = [(ENDS, 4, 0, 8)]
    if not ends_only:
        files.append((TOKENS, 2, 1, int(rec["dim"]) * _STORED[rec["dtype"]].itemsize))
    if rec["dtype"] == "int8" and not ends_only:
        files.append((SCALES, 3, 1, 4))
    for name, crc_slot, count_slot, unit in files:
        with open(path / name, "rb") as f:
            prev = 0
            for k, seg in enumerate(_SEGMENT.iter_unpack(segments)):
                lo, hi = prev * unit, seg[count_slot] * unit
                prev = seg[count_slot]
                if _crc_range(f, lo, hi) != seg[crc_slot]:
                    detail = f"its crc32 differs in commit {k} (bytes {lo}-{hi})"
                    raise DamagedFileError(path / name, detail, repair)
