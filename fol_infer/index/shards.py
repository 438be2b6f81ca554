"""A sharded map: ordinary index folders plus one manifest, and the exact merge of top lists.

Layout of MAP_DIR:
- ``map.json``          MapManifest: bundle fingerprint, build settings, and per shard its name,
                        the range of the sorted database file list it encodes, its image count
                        and the global id of its first image; ``complete`` is set last
- ``quantizer.faiss``   trained FAISS factories (IVF, PQ, SQ) only: the one trained, empty
                        index every shard adds to, so that shard scores are a single index's
- ``shard-00000/`` ...  index folders of the single-index format (`database.py`)

A shard encodes a contiguous range of the sorted file list that starts on a batch boundary, so
each image is encoded in the very batch a single-index build would put it in: same global id
(shard offset + local id), same path, same stored bytes. Global ids of a shard are known once
every shard before it is complete; they are written with the ``complete`` mark.
"""

from __future__ import annotations

import math
import os
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fol_infer import __version__
from fol_infer.errors import IndexStoreError, ShardMismatchError, UsageError
from fol_infer.files.ownership import Product
from fol_infer.index.metadata import (
    IndexMetadata,
    check_bundle,
    check_schema,
    read_json,
    write_json_atomic,
)

MANIFEST, QUANTIZER = "map.json", "quantizer.faiss"
SCHEMA_VERSION = 1
FORMAT = "fol-infer-map"
PRODUCT = Product("map", ((MANIFEST, FORMAT),))  # what `--force` may replace
PAD_SCORE = np.float32(-np.finfo(np.float32).max)  # FAISS's score for a missing inner-product hit


def is_map(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def name_key(name: str) -> str:
    """Where an index's image name sits in the sorted file list: `images.find_images` sorts
    by path components, which is string order once the separator sorts before every other
    character (a component ends before its longer siblings begin). Ten times cheaper than
    comparing `PurePosixPath.parts`: it runs over every name of a map at open."""
    return name.replace("/", "\0")


@dataclass
class ShardEntry:
    """One shard: what it encodes and, once complete, which global ids it holds."""

    name: str
    files: int  # files of the sorted list it encodes, unreadable ones included
    first: str  # its first and last file, named as the index names them: a re-run checks
    last: str  # that the database still splits the same way
    images: int = 0
    offset: int = 0

    @property
    def ids(self) -> range:
        return range(self.offset, self.offset + self.images)

    def describe(self) -> str:
        """The shard and its id range, as errors name them."""
        if not self.images:
            return f"{self.name} (no images)"
        return f"{self.name} (global ids {self.offset}..{self.offset + self.images - 1})"

    def mismatch(self, meta: IndexMetadata, root: str) -> str | None:
        """What the shard's own record says against this entry (None: it agrees): its image
        and file counts, its database root, and its first and last file. A shard folder
        replaced by another shard's copy, or an entry edited in map.json, disagrees here."""
        names = meta.paths + [name for name, _ in meta.failures]
        if len(meta.paths) != self.images:
            return f"it holds {len(meta.paths)} images, map.json records {self.images}"
        if len(names) != self.files:
            return f"it covers {len(names)} files, map.json records {self.files}"
        if meta.root != root:
            return f"its database root is {meta.root}, the map's is {root}"
        if names:
            first, last = min(names, key=name_key), max(names, key=name_key)
            if (first, last) != (self.first, self.last):
                return (
                    f"it covers {first!r}..{last!r}, map.json records {self.first!r}..{self.last!r}"
                )
        return None


@dataclass
class MapManifest:
    root: str
    bundle_sha256: str
    bundle_name: str
    settings: dict[str, Any]
    shards: list[ShardEntry] = field(default_factory=list)
    complete: bool = False
    pending_from: int | None = 0  # first shard of an unfinished build (None: complete)
    approximate: bool = False  # graph factories: per-shard graphs, not the single graph
    toolkit_version: str = __version__
    schema_version: int = SCHEMA_VERSION

    @property
    def images(self) -> int:
        return sum(s.images for s in self.shards)

    def check_bundle(self, sha256: str, name: str = "") -> None:
        check_bundle(self.bundle_sha256, self.bundle_name, sha256, name, "map")

    def rebuild_command(self, folder: Path | str) -> str:
        """The command that rebuilds the whole map from its database."""
        words = ["fol-infer", "index", self.bundle_name or "BUNDLE", self.root, "--out", folder]
        words += ["--force", "--shards", str(len(self.shards))]
        words += ["--tokens", self.settings.get("tokens", "fp16")]
        words += ["--faiss", self.settings.get("factory", "Flat")]
        words += ["--batch", str(self.settings.get("batch", 8))]
        return " ".join(shlex.quote(os.fsdecode(w)) for w in words)

    def check_consistent(self, folder: Path) -> None:
        """Refuse a complete map whose shard list no build writes: shards out of order or
        listed twice, id ranges that are not contiguous from 0, or two shards covering the
        same files. One line naming the shard."""
        offset = 0
        firsts: dict[str, str] = {}  # first file -> the shard that covers it
        for i, entry in enumerate(self.shards):
            problem = None
            if entry.name != shard_name(i):
                problem = f"is listed as shard {i}, where {shard_name(i)} belongs"
            elif entry.images < 0 or entry.files < entry.images:
                problem = f"records {entry.images} images of {entry.files} files"
            elif entry.offset != offset:
                problem = (
                    f"starts at global id {entry.offset}, but the shards before it hold "
                    f"{offset} images (overlapping or shifted id ranges)"
                )
            elif entry.files and entry.first in firsts:
                problem = f"covers the same files as {firsts[entry.first]}"
            if problem is not None:
                raise ShardMismatchError(
                    f"{folder / MANIFEST}: {entry.name} {problem}; map.json was edited or "
                    f"damaged: rebuild the map: {self.rebuild_command(folder)}"
                )
            firsts[entry.first] = entry.name
            offset += entry.images

    def require_complete(self, folder: Path) -> None:
        """Refuse to serve (or append to) a map whose build has not finished."""
        if not self.complete:
            what = "build" if not self.pending_from else "--append"
            raise IndexStoreError(
                f"{folder}: the map is not complete (its {what} was interrupted at "
                f"{self.pending_from}); re-run the same fol-infer index command to finish it"
            )

    def save(self, folder: Path) -> None:
        obj = {"format": FORMAT} | asdict(self)
        write_json_atomic(folder / MANIFEST, obj, "saving the map manifest to")

    @classmethod
    def load(cls, folder: Path) -> MapManifest:
        path = folder / MANIFEST
        obj = read_json(path, "map manifest")
        if obj.get("format") != FORMAT:
            raise IndexStoreError(f"{path} is not a fol-infer map manifest: rebuild the map")
        check_schema(obj.get("schema_version"), SCHEMA_VERSION, path, "map manifest")
        try:
            shards = [ShardEntry(**s) for s in obj["shards"]]
            return cls(
                root=str(obj["root"]),
                bundle_sha256=str(obj["bundle_sha256"]),
                bundle_name=str(obj["bundle_name"]),
                settings=dict(obj["settings"]),
                shards=shards,
                complete=bool(obj["complete"]),
                pending_from=obj["pending_from"],
                approximate=bool(obj["approximate"]),
                toolkit_version=str(obj["toolkit_version"]),
                schema_version=int(obj["schema_version"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexStoreError(f"{path} is damaged ({exc!r}): rebuild the map") from None


def plan_ranges(n_files: int, n_shards: int, batch: int) -> list[range]:
    """Split positions 0..n_files-1 into `n_shards` contiguous ranges of whole batches, as
    even as whole batches allow (see the module doc for why they start on batch boundaries)."""
    if n_shards < 1:
        raise UsageError(f"--shards must be at least 1, got {n_shards}")
    if n_shards > n_files:
        raise UsageError(f"--shards {n_shards} is more than the {n_files} images to index")
    n_batches = math.ceil(n_files / batch)
    if n_shards > n_batches:
        raise UsageError(
            f"--shards {n_shards} with --batch {batch}: {n_files} images make {n_batches} "
            "batches, and a shard holds whole batches (so that its bytes equal a single "
            f"index's): use at most {n_batches} shards or --batch {max(1, n_files // n_shards)}"
        )
    per, extra = divmod(n_batches, n_shards)
    ranges, start = [], 0
    for i in range(n_shards):
        stop = min(n_files, start + (per + (i < extra)) * batch)
        ranges.append(range(start, stop))
        start = stop
    return ranges


def merge_top_k(
    parts: list[tuple[np.ndarray, np.ndarray]], k: int, nq: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top lists into the global top `k`, exactly.

    `parts` holds each shard's (nq, k_s) scores and GLOBAL ids (-1: no hit; k_s may be 0).
    Order: score descending, then the larger global id first, which is how FAISS orders ties
    (IndexFlat, IndexIVF and IndexShards alike), so a map answers as its single index does.
    Missing places are padded with id -1 and FAISS's padding score.
    """
    scores = np.full((nq, k), PAD_SCORE, np.float32)
    ids = np.full((nq, k), -1, np.int64)
    if not parts:
        return scores, ids
    all_scores = np.concatenate([p[0].reshape(nq, -1) for p in parts], axis=1)
    all_ids = np.concatenate([p[1].reshape(nq, -1) for p in parts], axis=1).astype(np.int64)
    for q in range(nq):
        valid = all_ids[q] >= 0
        s, i = all_scores[q][valid], all_ids[q][valid]
        order = np.lexsort((-i, -s.astype(np.float64)))[:k]
        scores[q, : len(order)], ids[q, : len(order)] = s[order], i[order]
    return scores, ids
