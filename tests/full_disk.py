"""A full disk for one file: the writes of its temporary fail with ENOSPC, as they would."""

from __future__ import annotations

import os
from typing import IO

import pytest


def full_disk_for(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes of the temporary beside the file `name` go to /dev/full (ENOSPC on flush)."""
    real = os.fdopen

    def fdopen(fd: int, *args: object, **kwargs: object) -> IO[bytes]:
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{name}."):
            os.close(fd)
            return open("/dev/full", "wb")  # noqa: SIM115 (the writer closes it)
        return real(fd, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", fdopen)
