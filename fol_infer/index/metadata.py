"""What an index knows about its images and how it was built; index write errors.

`IndexMetadata` is one small JSON file: the database images (paths relative to the database
root, so a moved database still opens), their UTM coordinates when the file names carry them
(`fol_infer.positions.parse_utm`), the sha256 of the bundle manifest that
encoded them, the build settings, and the images that failed and why.

Crash safety: every file of the index that is rewritten as a whole (this metadata, the token
store's commit record, the FAISS file) is written through `fol_infer.files.atomic.atomic_writer`, so
a reader sees either the old file or the new one, never a mixture.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fol_infer import __version__
from fol_infer.errors import IndexStoreError
from fol_infer.files.atomic import atomic_write_json
from fol_infer.positions import parse_utm

SCHEMA_VERSION = 1
FORMAT = "fol-infer-index-metadata"


def store_error(exc: OSError, doing: str, path: Path | str) -> IndexStoreError:
    """Turn an OS error during a write into the one-line error a user can act on."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return IndexStoreError(
            f"disk full while {doing} {path}: free space and rerun; "
            "the index is left at its last committed state"
        )
    return IndexStoreError(
        f"cannot write {path} while {doing} ({exc.strerror or exc}); "
        "the index is left at its last committed state"
    )


def write_json_atomic(path: Path | str, obj: Any, doing: str) -> None:
    """Write `obj` as JSON through `atomic_writer`; OS errors become `IndexStoreError`."""
    try:
        atomic_write_json(path, obj, indent=1)
    except OSError as exc:
        raise store_error(exc, doing, path) from exc


def read_json(path: Path | str, what: str, repair: str | None = None) -> dict[str, Any]:
    """Read a JSON object, naming the file and what to do when it is missing or unreadable
    (`repair`: the command that repairs it, where one does)."""
    todo = f"repair: {repair}" if repair else f"rebuild the {what}"
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise IndexStoreError(f"{path} is missing: this is not a complete {what}; {todo}") from None
    except (OSError, ValueError) as exc:
        raise IndexStoreError(f"{path} is unreadable ({exc}): {todo}") from None
    if not isinstance(obj, dict):
        raise IndexStoreError(f"{path} is not a {what} record: {todo}")
    return obj


def check_schema(found: object, expected: int, path: Path | str, what: str) -> None:
    """Refuse a file written by another on-disk schema, naming both versions."""
    if found != expected:
        raise IndexStoreError(
            f"{path} is a {what} of schema version {found}, this fol-infer "
            f"({__version__}) reads version {expected}: rebuild the {what} with this version"
        )


def repair_command(folder: Path | str) -> str:
    """The command that repairs an index, or a map's shard in place (`fol-infer repair`):
    derived files are rebuilt from the stored descriptors, damaged stores re-encoded."""
    return shlex.join(["fol-infer", "repair", os.fsdecode(os.path.abspath(folder))])


def check_bundle(built_sha256: str, built_name: str, sha256: str, name: str, what: str) -> None:
    """Refuse an index or map built by another bundle than the engine's, naming both."""
    if sha256 != built_sha256:
        built = f"{built_name or 'bundle'} (manifest sha256 {built_sha256[:12]})"
        given = f"{name or 'bundle'} (manifest sha256 {sha256[:12]})"
        raise IndexStoreError(
            f"this {what} was built by {built} but the engine is {given}: "
            f"use the bundle that built it or rebuild the {what} with this one"
        )


@dataclass
class IndexMetadata:
    """Everything about an index but its vectors; row i describes image id i.

    `paths` are POSIX paths relative to `root` (the database root at build time).
    `failures` lists images that could not be encoded, as (relative path, reason); they have
    no id. `failure_stamps` keeps each failed file's [size, mtime_ns] when it failed, so that
    an append retries a file that changed since (re-copied). `settings` holds the build
    settings (resolution, factory, token dtype, ...) as JSON values.
    """

    root: str
    bundle_sha256: str
    bundle_name: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    failure_stamps: dict[str, list[int]] = field(default_factory=dict)
    toolkit_version: str = __version__
    schema_version: int = SCHEMA_VERSION

    @property
    def utm(self) -> np.ndarray | None:
        """(N, 2) float64 east/north per image (NaN rows where a name has none), or None
        when no name carries coordinates. Derived from the names so it cannot drift from them."""
        coords = [parse_utm(p) for p in self.paths]
        if all(c is None for c in coords):
            return None
        nan = (float("nan"), float("nan"))
        return np.array([c if c is not None else nan for c in coords], dtype=np.float64)

    def name_of(self, path: str | os.PathLike[str]) -> str:
        """How the index names an image: relative to `root` when under it (so a moved
        database still opens), as given otherwise (images appended from another folder)."""
        q, root = Path(path), Path(self.root)
        return (q.relative_to(root) if q.is_relative_to(root) else q).as_posix()

    def add_images(self, paths: Sequence[str | os.PathLike[str]]) -> None:
        """Append images in id order, named by `name_of`."""
        self.paths.extend(self.name_of(p) for p in paths)

    def forget_failure(self, name: str) -> None:
        """Drop a recorded failure (its file is about to be tried again)."""
        self.failures = [f for f in self.failures if f[0] != name]
        self.failure_stamps.pop(name, None)

    def check_bundle(self, sha256: str, name: str = "") -> None:
        """Refuse to serve an index with a bundle other than the one that built it."""
        check_bundle(self.bundle_sha256, self.bundle_name, sha256, name, "index")

    def save(self, path: Path | str) -> None:
        """Write atomically (see module doc)."""
        obj = {
            "format": FORMAT,
            "schema_version": self.schema_version,
            "toolkit_version": self.toolkit_version,
            "root": self.root,
            "bundle_sha256": self.bundle_sha256,
            "bundle_name": self.bundle_name,
            "settings": self.settings,
            "paths": self.paths,
            "failures": [list(f) for f in self.failures],
            "failure_stamps": self.failure_stamps,
        }
        write_json_atomic(path, obj, "saving index metadata to")

    @classmethod
    def load(cls, path: Path | str, repair: str | None = None) -> IndexMetadata:
        """Read ``index.json``; `repair`: the command that rebuilds it (a map's shard has
        one), else the message says to rebuild the index."""
        todo = f"repair: {repair}" if repair else "rebuild the index"
        obj = read_json(path, "index metadata", repair)
        if obj.get("format") != FORMAT:
            raise IndexStoreError(f"{path} is not fol-infer index metadata: {todo}")
        check_schema(obj.get("schema_version"), SCHEMA_VERSION, path, "index metadata")
        try:
            return cls(
                root=str(obj["root"]),
                bundle_sha256=str(obj["bundle_sha256"]),
                bundle_name=str(obj.get("bundle_name", "")),
                settings=dict(obj["settings"]),
                paths=[str(p) for p in obj["paths"]],
                failures=[(str(p), str(r)) for p, r in obj["failures"]],
                failure_stamps={
                    str(p): [int(v) for v in stamp]
                    for p, stamp in dict(obj.get("failure_stamps", {})).items()
                },
                toolkit_version=str(obj["toolkit_version"]),
                schema_version=int(obj["schema_version"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexStoreError(f"{path} is damaged ({exc!r}): {todo}") from None
