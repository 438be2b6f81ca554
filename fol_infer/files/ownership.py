"""May a command replace this folder? Only a folder fol-infer made, never one holding the input.

`--force` replaces a bundle (``export``), an index or a sharded map (``index``). Each is
recognised by the format markers its own module declares as a `Product` (``bundle.PRODUCT``,
``index.database.PRODUCT``, ``index.shards.PRODUCT``), never by its name: a bundle by
``manifest.json`` carrying the bundle format (or, for bundles written before the marker
existed, the manifest's own keys); a map by ``map.json`` carrying the map format; an index by
``index.json`` carrying the index-metadata format, or, when that file is damaged, by its
``descriptors/`` token store's record. This module imports none of them. An empty folder may
be replaced too (nothing is lost), as may one holding only what a killed fol-infer write left
(`atomic.is_leftover`).
Anything else is refused, as is any folder that is, contains, or is inside one of the
command's inputs (database folder, bundle, checkpoint), whatever it holds.

The same rule guards every output file a command writes (`check_outputs`: ``query --csv``,
``show ... --out``, ``bench --json``, ...): never an input, a link to one, or a path inside an
input folder; never another output of the same command; never an existing folder, and only
where its folder exists and is writable. All checked before any work starts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fol_infer.errors import UsageError
from fol_infer.files.atomic import final_path, holds_only_leftovers


@dataclass(frozen=True)
class Product:
    """What fol-infer makes and `--force` may replace, as its own module declares it: the
    files inside such a folder and the "format" each carries, any of which identifies it
    (`legacy_keys`: a first marker file written before the "format" key existed is
    recognised by these keys)."""

    name: str
    markers: tuple[tuple[str, str], ...]
    legacy_keys: frozenset[str] = frozenset()

    def __str__(self) -> str:
        return self.name


def _json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def is_product(folder: Path, product: Product) -> bool:
    """Whether `folder` is one `product` fol-infer made, by its format markers."""
    for index, (name, fmt) in enumerate(product.markers):
        obj = _json(folder / name)
        if obj is None:
            continue
        if obj.get("format") == fmt:
            return True
        legacy = product.legacy_keys and index == 0 and "format" not in obj
        if legacy and product.legacy_keys <= obj.keys():
            return True
    return False


Inputs = Mapping[str, Path | str] | Iterable[tuple[str, Path | str]]  # what -> path


@dataclass(frozen=True)
class _Place:
    """A path as given, normalised, resolved (links followed) and its file's identity."""

    given: Path | str
    normal: str
    real: Path
    inode: tuple[int, int] | None  # (device, inode) where it exists

    @classmethod
    def of(cls, given: Path | str) -> _Place:
        try:
            st = os.stat(given)
            inode: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except OSError:
            inode = None
        return cls(given, os.path.abspath(given), Path(given).resolve(), inode)

    def relation(self, other: _Place) -> str | None:
        """How this path stands to `other`: it "is" it, "is a link to" it (a symbolic or hard
        link, or a path through one), "contains" it, "is inside" it, or None."""
        if self.real == other.real or (self.inode is not None and self.inode == other.inode):
            return "is" if self.normal == other.normal else "is a link to"
        if other.real.is_relative_to(self.real):
            return "contains"
        if self.real.is_relative_to(other.real):
            return "is inside"
        return None


def _places(inputs: Inputs) -> list[tuple[str, _Place]]:
    pairs = inputs.items() if isinstance(inputs, Mapping) else inputs
    return [(what, _Place.of(given)) for what, given in pairs]


def check_not_input(
    path: Path,
    inputs: Inputs,
    action: str = "replace",
    advice: str = "choose an --out outside it",
) -> None:
    """Refuse a `path` that is, contains or is inside one of `inputs` (what -> path), or is
    a link to one: writing it would destroy what the command reads."""
    _refuse_inputs(path, _places(inputs), action, advice)


def _refuse_inputs(path: Path, inputs: list[tuple[str, _Place]], action: str, advice: str) -> None:
    place = _Place.of(path)
    for what, given in inputs:
        relation = place.relation(given)
        if relation is not None:
            raise UsageError(
                f"refusing to {action} {path}: it {relation} the {what} {given.given}, which "
                f"this command reads; {advice}"
            )


def check_outputs(outputs: Mapping[str, Path | None], inputs: Inputs = ()) -> None:
    """Refuse, before any work, output files (option -> path; None: not asked for) that would
    overwrite an input or one another, or that cannot be written: an existing folder, a
    missing or unwritable parent folder. `inputs` as for `check_not_input`."""
    places = _places(inputs)
    earlier: list[tuple[str, _Place]] = []
    for option, path in outputs.items():
        if path is None:
            continue
        _refuse_inputs(path, places, f"write {option}", f"choose another path for {option}")
        place = _Place.of(path)
        for other_option, other in earlier:
            if place.relation(other) in ("is", "is a link to"):
                raise UsageError(
                    f"{option} and {other_option} are the same file ({path}): give each "
                    "output its own path"
                )
        earlier.append((option, place))
        if path.is_dir():
            raise UsageError(f"{option} {path} is a folder: give the path of a file in it")
        parent = final_path(path).parent
        if not parent.is_dir():
            raise UsageError(
                f"{option} {path}: the folder {parent} does not exist; create it first"
            )
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(
                f"{option} {path}: the folder {parent} is not writable; choose another path"
            )


def check_replaceable(folder: Path, product: Product, inputs: Mapping[str, Path | str]) -> None:
    """What `--force` checks before a byte is written; nothing to check when `folder` is new."""
    if not folder.exists() and not folder.is_symlink():
        return
    check_not_input(folder, inputs)
    if not folder.is_dir():
        raise UsageError(
            f"refusing to replace {folder}: it is a file, not a fol-infer {product}; "
            "remove it yourself or choose another --out"
        )
    if not holds_only_leftovers(folder) and not is_product(folder, product):
        raise UsageError(
            f"refusing to replace {folder}: it is not a fol-infer {product} (no "
            f"{product.markers[0][0]} of this tool) and --force replaces only a {product} "
            "fol-infer made; move your files elsewhere or choose another --out"
        )


def occupied(folder: Path, product: Product) -> str:
    """What to say when `folder` exists and no `--force` was given: suggest it only where it
    would be accepted."""
    if folder.is_dir() and is_product(folder, product):
        return f"{folder} already holds a {product}: pass --force to replace it"
    return (
        f"{folder} exists and is not a fol-infer {product}: choose another --out "
        f"(--force replaces only a {product} fol-infer made, or an empty folder)"
    )
