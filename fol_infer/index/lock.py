"""One writer per index: an exclusive lock taken before the first byte is written.

The lock is an ``fcntl.flock`` on ``.<index name>.lock`` beside the index folder (not inside
it: a new build has no folder yet, and ``--force`` builds in a sibling folder and swaps it in,
while the lock must name the same index throughout). `build_index` holds it across every
store, the FAISS file and the metadata, from the first check of the folder to the last
rename, and the operating system releases it on every exit, kill -9 included. A second writer
is refused at once, naming the index and the process holding it, or, with ``wait``, waits
for it. The lock file holds the holder's pid and command line for that message; the holder
removes it before letting go, and a writer that finds it locked a file since removed locks
the new one instead (so a lock file never outlives its writer but after a kill). The thread
that holds a lock may take it again (a repair that rebuilds a FAISS file it checked under
the lock); another thread of the same process is a second writer. Readers take no lock:
they read only what ``index.json`` has committed.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO

from fol_infer.errors import UsageError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory lock, one writer by convention
    fcntl = None  # type: ignore[assignment]


class IndexBusyError(UsageError):
    """Another process is writing this index."""

    exit_code = 3


def lock_path(index: Path) -> Path:
    return index.parent / f".{index.name}.lock"


_HELD: dict[str, tuple[int, int]] = {}  # lock file -> (holding thread, depth) in this process
_HELD_LOCK = threading.Lock()


class WriterLock:
    """``with WriterLock(index_folder, wait=False):`` holds the index's writer lock."""

    def __init__(
        self, index: Path | str, wait: bool = False, notice: Callable[[str], None] | None = None
    ) -> None:
        self.index = Path(index)
        self.path = lock_path(self.index)
        self.wait = wait
        self.notice = notice
        self._file: IO[bytes] | None = None
        self._key = os.path.abspath(self.path)
        self._nested = False

    def __enter__(self) -> WriterLock:
        with _HELD_LOCK:
            holder, depth = _HELD.get(self._key, (None, 0))
            if holder == threading.get_ident():
                _HELD[self._key] = (holder, depth + 1)
                self._nested = True
                return self
        if fcntl is None:
            return self
        while self._file is None:
            f = self._open()
            try:
                self._lock(f)
            except BaseException:
                f.close()
                raise
            if _same_file(f, self.path):
                self._file = f
            else:  # the previous holder removed the file as it let go: lock the new one
                f.close()
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()}: {' '.join(sys.argv)}\n".encode(errors="replace"))
        self._file.flush()
        with _HELD_LOCK:
            _HELD[self._key] = (threading.get_ident(), 1)
        return self

    def _open(self) -> IO[bytes]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return open(self.path, "a+b")
        except OSError as exc:
            raise UsageError(
                f"cannot create the writer lock {self.path} of {self.index} "
                f"({exc.strerror or exc}): the folder holding the index must be writable"
            ) from None

    def _lock(self, f: IO[bytes]) -> None:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError:
            pass
        busy = f"{self.index} is being written by another fol-infer process ({_holder(f)})"
        if not self.wait:
            raise IndexBusyError(
                f"{busy}: nothing was written; run again when it has finished, "
                "or pass --wait to wait for it"
            )
        if self.notice is not None:
            self.notice(f"{busy}: waiting for it to finish")
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with _HELD_LOCK:
            holder, depth = _HELD.get(self._key, (None, 0))
            if self._nested:
                _HELD[self._key] = (holder, depth - 1)  # type: ignore[assignment]
                self._nested = False
                return
            _HELD.pop(self._key, None)
        f, self._file = self._file, None
        if f is None:
            return
        try:  # removed while still held, so no other writer can hold this file meanwhile
            self.path.unlink()
        except OSError:
            pass
        f.close()  # closing the descriptor releases the flock


def _same_file(f: IO[bytes], path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(f.fileno()), os.stat(path))
    except OSError:
        return False


def _holder(f: IO[bytes]) -> str:
    """The holder's "pid N: command" as it wrote it, or a neutral phrase."""
    try:
        f.seek(0)
        text = f.read(300).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "pid unknown"
