"""Durable file and folder replacement: the one place the toolkit's write idioms live.

A reader must see either the old file or folder or the new one, never a mixture, and a crash
must never leave the old one lost. Files: write a temporary sibling, fsync it, `os.replace`
it over the target, fsync the folder. Folders: build in a temporary sibling, then
`replace_folder` swaps it into place, putting the old folder back if the swap fails.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def fsync_dir(path: Path | str) -> None:
    """Make a rename or a new file in `path` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_writer(path: Path | str) -> Iterator[IO[bytes]]:
    """Yield a binary file that replaces `path` only if the block completes.

    A crash leaves at most a stray ``<name>.tmp`` beside the target, which the next write of
    the same target overwrites.
    """
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    f = open(tmp, "wb")
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, target)
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably."""
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_json(path: Path | str, obj: Any, indent: int = 2) -> None:
    """Replace `path` with `obj` as JSON (one trailing newline) atomically and durably."""
    atomic_write_bytes(path, (json.dumps(obj, indent=indent) + "\n").encode())


def replace_folder(new: Path | str, target: Path | str) -> None:
    """Move the finished folder `new` to `target`, replacing what is there.

    The old `target` is renamed aside first and deleted only once `new` is in place; if that
    rename fails, the old folder is put back, so `target` is never left missing. `new` must be
    a sibling of `target` (same file system, so each rename is atomic).
    """
    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
        fsync_dir(target.parent)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)  # left by a crash of this pid's earlier run
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
