"""Durable file and folder replacement: the one place the toolkit's write idioms live.

A reader must see either the old file or folder or the new one, never a mixture, and a crash
must never leave the old one lost. Files: write a hidden, uniquely named temporary sibling,
fsync it, `os.replace` it over the target, fsync the folder; several files at once
(`atomic_write_all`) are all written before any is renamed. Folders: build in a temporary
sibling, then `replace_folder` swaps it into place, putting the old folder back if the swap
fails.
"""

from __future__ import annotations

import glob
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from fol_infer.errors import OutputWriteError

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


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


Writer = Callable[[IO[bytes]], object]  # fills an open binary file (e.g. savefig, np.savez)


def final_path(path: Path | str) -> Path:
    """Where a write of `path` lands: a symbolic link's target, as ``open(path, "w")`` would
    write (the link itself stays a link)."""
    target = Path(path)
    return Path(os.path.realpath(target)) if target.is_symlink() else target


def _hidden_names(target: Path, suffix: str) -> Iterator[Path]:
    """Fresh hidden names beside `target`, ``.<name>.<random><suffix>``: a temporary never
    meets (and never deletes) a user's own file or folder."""
    while True:
        yield target.with_name(f".{target.name}.{secrets.token_hex(4)}{suffix}")


def new_sibling_folder(target: Path | str) -> Path:
    """Create and return an empty hidden folder beside `target` to build it in (then
    `replace_folder`), with the mode ``os.mkdir`` gives (0o777 less the umask)."""
    names = _hidden_names(Path(target), ".partial")
    while True:
        folder = next(names)
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder


def _temporary(target: Path) -> tuple[IO[bytes], Path]:
    """A new hidden file beside `target` (``.<name>.<random>.tmp``), with the mode
    ``open(target, "w")`` would leave: the old file's when it is replaced, else 0o666 less
    the umask (applied by the kernel at creation)."""
    try:
        mode: int | None = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        mode = None
    names = _hidden_names(target, ".tmp")
    while True:
        tmp = next(names)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        except OSError as exc:
            raise _naming(exc, target, tmp) from None
        break
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        return os.fdopen(fd, "wb"), tmp
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def _filling(target: Path) -> Iterator[tuple[IO[bytes], Path]]:
    """A temporary beside `target` to fill, fsynced when the block ends; on any failure the
    temporary is removed and the exception goes on."""
    f, tmp = _temporary(target)
    try:
        with f:
            yield f, tmp
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _naming(exc, target, tmp) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _naming(exc: OSError, target: Path, tmp: Path | None = None) -> OSError:
    """`exc` naming the target rather than a temporary (or nothing: a failed write, e.g. disk
    full), so that a message says which file could not be written."""
    if exc.filename is None or (tmp is not None and exc.filename == str(tmp)):
        exc.filename, exc.filename2 = str(target), None
    return exc


def _rename(written: list[tuple[Path, Path]]) -> None:
    """Move each complete temporary over its target; a failure removes those not moved."""
    try:
        for tmp, target in written:
            try:
                os.replace(tmp, target)
            except OSError as exc:
                raise _naming(exc, target, tmp) from None
    except BaseException:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise
    for folder in dict.fromkeys(target.parent for _, target in written):
        fsync_dir(folder)


@contextmanager
def atomic_writer(path: Path | str) -> Iterator[IO[bytes]]:
    """Yield a binary file that replaces `path` only if the block completes.

    The old file stays whole until the rename, and any failure (an exception in the block,
    disk full) removes the temporary. A crash (kill -9, power loss) can leave one hidden
    ``.<name>.<random>.tmp`` beside the target, never a damaged target.
    """
    target = final_path(path)
    with _filling(target) as (f, tmp):
        yield f
    _rename([(tmp, target)])


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably."""
    atomic_write_all({Path(path): data})


def atomic_write_json(path: Path | str, obj: Any, indent: int = 2) -> None:
    """Replace `path` with `obj` as JSON (one trailing newline) atomically and durably."""
    atomic_write_bytes(path, (json.dumps(obj, indent=indent) + "\n").encode())


def atomic_write_all(files: Mapping[Path, bytes | Writer]) -> None:
    """Replace several files, all or none: every temporary is written and fsynced before the
    first rename, so a failed write (disk full, an unwritable folder, an error in a `Writer`)
    leaves every target as it was and no temporary behind. The renames that follow take no
    data blocks. Each value is the new bytes or a `Writer` that fills an open file."""
    written: list[tuple[Path, Path]] = []
    try:
        for path, content in files.items():
            target = final_path(path)
            with _filling(target) as (f, tmp):
                if isinstance(content, bytes):
                    f.write(content)
                else:
                    content(f)
            written.append((tmp, target))
    except BaseException:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise
    _rename(written)


def write_outputs(files: Mapping[Path, bytes | Writer]) -> None:
    """A command's output files, all or none (`atomic_write_all`): an OS error (disk full, a
    folder gone) becomes one `OutputWriteError` naming the file; every old file is kept."""
    try:
        atomic_write_all(files)
    except OSError as exc:
        raise OutputWriteError(f"cannot write {exc.filename}: {exc.strerror or exc}") from None


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


_LEFTOVER = re.compile(r"\..+\.(tmp|old)-\d+|\..+\.[0-9a-f]{8}\.(tmp|partial)|\..+\.partial-\w+")


def is_leftover(name: str) -> bool:
    """Whether `name` is one fol-infer gives its temporaries (a hidden sibling of what it
    writes: ``.<name>.tmp-<pid>``, ``.<name>.old-<pid>``, ``.<name>.<random>.tmp`` and
    ``.partial``, an export's ``.<name>.partial-<random>``), which a kill can leave behind."""
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
