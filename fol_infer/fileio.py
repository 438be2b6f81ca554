"""Durable file and folder replacement: the one place the toolkit's write idioms live.

A reader must see either the old file or folder or the new one, never a mixture, and a crash
must never leave the old one lost. Files: write a temporary sibling, fsync it, `os.replace`
it over the target, fsync the folder. Folders: build in a temporary sibling, then
`replace_folder` swaps it into place, putting the old folder back if the swap fails.
"""

from __future__ import annotations

import glob
import json
import os
import re
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

    A crash leaves at most a stray hidden ``.<name>.tmp-<pid>`` beside the target (a
    `is_leftover` name).
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
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
    rename fails, the old folder is put back, so `target` is never left missing but by a kill
    between the two renames (the caller's next run finds `new` and swaps it in; the old
    folder, left as ``.<target>.old-<pid>``, is deleted then). `new` must be a sibling of
    `target` (same file system, so each rename is atomic).
    """
    new, target = Path(new), Path(target)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)  # left by a crash of this pid's earlier run
        os.replace(target, old)
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(old, target)
            raise
    else:
        os.replace(new, target)
    fsync_dir(target.parent)
    for stale in target.parent.glob(f".{glob.escape(target.name)}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)


_LEFTOVER = re.compile(r"\..+\.(tmp|old)-\d+|\..+\.tmp")


def is_leftover(name: str) -> bool:
    """Whether `name` is one fol-infer gives its temporaries (a hidden sibling of what it
    writes: ``.<name>.tmp-<pid>``, ``.<name>.old-<pid>``, ``.<name>.<random>.tmp``), which a
    kill can leave behind."""
    return _LEFTOVER.fullmatch(name) is not None


def holds_only_leftovers(folder: Path) -> bool:
    """Whether `folder` is empty but for what killed fol-infer writes left (so a command may
    take it as empty)."""
    return all(is_leftover(entry.name) for entry in folder.iterdir())


def remove_leftovers(folder: Path) -> None:
    """Delete what killed fol-infer writes left in `folder` (`is_leftover` names). Only a
    writer holding the folder's lock may call it: no other write can be under way there."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if is_leftover(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
