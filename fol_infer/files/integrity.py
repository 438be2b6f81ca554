"""Checks that the files served are the bytes that were recorded, made where they are cheap.

What is checked at open (``verify="cached"``, the default of `Bundle.open` and `Database`):
the bundle's ONNX graphs against the manifest's sha256, and the index's ``global.faiss``
against the sha256 in its own footer (hashed while FAISS reads it, so no second read). A
file that passed is remembered in the user's cache (``verified.json`` under
`fol_infer.files.user_cache.cache_dir`, never inside the bundle or index, which may be read-only),
keyed by its path, size, mtime_ns, ctime_ns, inode and device and by the digest it matched:
the next open of the unchanged file skips the hash. Writing a file changes its mtime and
ctime (ctime cannot be set back from user space), so an edited file is hashed again.

``verify="sizes"`` skips hashing (sizes and structure only); ``"full"`` hashes every file,
the cache notwithstanding, including the token stores' per-commit crc32 (`TokenStore`).
Token rows are too large to hash at open; what a query reads is checked to be finite, and a
damaged row is named with the command that rebuilds it (`check_finite`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import get_args

import numpy as np

from fol_infer.choices import VerifyLevel
from fol_infer.errors import DamagedFileError, UsageError
from fol_infer.files.user_cache import cache_dir

log = logging.getLogger(__name__)

VERIFY_LEVELS: tuple[VerifyLevel, ...] = get_args(VerifyLevel)
CACHE_FILE = "verified.json"
_FORMAT = "fol-infer-verified-files"
_MAX_ENTRIES = 1024  # oldest dropped first: a forgotten entry only costs one more hash
_CHUNK = 1 << 22


def sha256_file(path: Path, chunk: int = _CHUNK) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_identity(path: Path) -> list[int]:
    """What must stay equal for a verified file to count as the same bytes."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def check_level(verify: str) -> VerifyLevel:
    if verify not in VERIFY_LEVELS:
        raise UsageError(f"verify must be one of {', '.join(VERIFY_LEVELS)}, not {verify!r}")
    return verify


class VerificationCache:
    """Files already hashed and found equal to a digest (see the module doc)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_dir() / CACHE_FILE

    def _load(self) -> dict[str, list]:
        try:
            obj = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(obj, dict) or obj.get("format") != _FORMAT:
            return {}
        entries = obj.get("entries")
        return entries if isinstance(entries, dict) else {}

    def vouches_for(self, path: Path, digest: str) -> bool:
        """True when this exact file (identity unchanged) was found equal to `digest`."""
        entry = self._load().get(_key(path))
        try:
            return entry == [*file_identity(path), digest]
        except OSError:
            return False

    def remember(self, path: Path, digest: str) -> None:
        """Record a match; best effort (a cache that cannot be written just means rehashing)."""
        try:
            entries = self._load()
            key = _key(path)
            entries.pop(key, None)
            entries[key] = [*file_identity(path), digest]
            while len(entries) > _MAX_ENTRIES:
                entries.pop(next(iter(entries)))
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{CACHE_FILE}.{os.getpid()}-{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps({"format": _FORMAT, "entries": entries}))
            os.replace(tmp, self.path)
        except OSError as exc:
            log.debug("cannot record a verified file in %s: %s", self.path, exc)


def _key(path: Path) -> str:
    return os.fsdecode(os.path.realpath(path))


def needs_hash(path: Path, digest: str, verify: VerifyLevel) -> bool:
    """Whether `path` must be hashed at this level (the cache answers for "cached")."""
    if verify == "sizes":
        return False
    return verify == "full" or not VerificationCache().vouches_for(path, digest)


def check_sha256(path: Path, digest: str, verify: VerifyLevel, repair: str) -> None:
    """Refuse a file whose sha256 differs from `digest`, naming it and its `repair`."""
    if not needs_hash(path, digest, verify):
        return
    if sha256_file(path) != digest:
        raise DamagedFileError(path, "its sha256 differs from the recorded one", repair)
    VerificationCache().remember(path, digest)


def all_finite(arr: np.ndarray) -> bool:
    """No NaN or Inf, from the bits: exponent all ones. Integer SIMD, so float16 is as fast as
    float32 (numpy's float16 min/max run a scalar loop, 150x slower: 0.5 s per query at K=100).
    """
    if arr.size == 0:
        return True
    if arr.dtype not in (np.float16, np.float32):
        return bool(np.isfinite(arr).all())
    uint, inf_bits = (np.uint16, 0x7C00) if arr.dtype == np.float16 else (np.uint32, 0x7F800000)
    magnitude = np.bitwise_and(np.ascontiguousarray(arr).view(uint), inf_bits | (inf_bits - 1))
    return int(magnitude.max()) < inf_bits
