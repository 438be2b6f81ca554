"""Atomic writes: hidden unique temporaries, the modes a plain open gives, all-or-none groups,
a full disk that leaves every old file as it was."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import IO

import pytest
from full_disk import full_disk_for

from fol_infer.errors import OutputWriteError
from fol_infer.files import atomic
from fol_infer.files.atomic import (
    atomic_write_all,
    atomic_write_bytes,
    atomic_writer,
    write_outputs,
)


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_temporaries_are_hidden_unique_and_never_a_users_file(tmp_path: Path) -> None:
    (tmp_path / "r.csv.tmp").write_bytes(b"the user's own file")  # the old fixed temp name
    (tmp_path / ".r.csv.tmp").write_bytes(b"another of theirs")
    seen = []

    def spy(f: IO[bytes]) -> None:
        seen.extend(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp"))
        f.write(b"new")

    atomic_write_all({tmp_path / "r.csv": spy})
    (temporary,) = set(seen) - {"r.csv.tmp", ".r.csv.tmp"}
    assert temporary.startswith(".r.csv.") and temporary.endswith(".tmp")
    assert listing(tmp_path) == {
        "r.csv": b"new", "r.csv.tmp": b"the user's own file", ".r.csv.tmp": b"another of theirs"
    }  # fmt: skip


def test_modes_are_those_a_plain_open_gives(tmp_path: Path) -> None:
    old_umask = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "new", b"x")
        with open(tmp_path / "plain", "wb"):
            pass
    finally:
        os.umask(old_umask)
    mode = stat.S_IMODE((tmp_path / "new").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o640
    (tmp_path / "kept").write_bytes(b"old")
    os.chmod(tmp_path / "kept", 0o604)
    atomic_write_bytes(tmp_path / "kept", b"new")  # replacing keeps the old file's mode
    assert stat.S_IMODE((tmp_path / "kept").stat().st_mode) == 0o604


def test_a_symbolic_link_is_written_through_and_stays_a_link(tmp_path: Path) -> None:
    (tmp_path / "real.csv").write_bytes(b"old")
    (tmp_path / "link.csv").symlink_to("real.csv")
    atomic_write_bytes(tmp_path / "link.csv", b"new")
    assert (tmp_path / "link.csv").is_symlink() and (tmp_path / "real.csv").read_bytes() == b"new"


def test_several_files_are_written_all_or_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = tmp_path / "pairs.txt", tmp_path / "results.csv"
    a.write_bytes(b"old pairs")
    b.write_bytes(b"old rows")
    full_disk_for("results.csv", monkeypatch)
    with pytest.raises(OSError) as err:
        atomic_write_all({a: b"new pairs", b: b"new rows"})
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(b)
    with pytest.raises(OutputWriteError, match=r"^cannot write .*results.csv: No space left"):
        write_outputs({a: b"new pairs", b: b"new rows"})
    assert listing(tmp_path) == {"pairs.txt": b"old pairs", "results.csv": b"old rows"}
    monkeypatch.undo()
    with pytest.raises(OutputWriteError, match="No such file or directory"):
        write_outputs({a: b"new pairs", tmp_path / "gone" / "x.csv": b"x"})
    assert listing(tmp_path) == {"pairs.txt": b"old pairs", "results.csv": b"old rows"}
    write_outputs({a: b"new pairs", b: b"new rows"})
    assert listing(tmp_path) == {"pairs.txt": b"new pairs", "results.csv": b"new rows"}


def test_atomic_writer_keeps_the_old_file_on_any_failure(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_writer(target) as f:
        f.write(b"new but never finished")
        raise KeyboardInterrupt
    assert listing(tmp_path) == {"f": b"old"}


def test_a_build_folder_is_hidden_unique_and_never_a_users(tmp_path: Path) -> None:
    (tmp_path / ".syn.partial").mkdir()  # the old fixed name, deleted by the old code
    (tmp_path / ".syn.partial" / "mine.txt").write_text("keep")
    folder = atomic.new_sibling_folder(tmp_path / "syn")
    assert folder.parent == tmp_path and folder.name.startswith(".syn.") and folder.is_dir()
    assert (tmp_path / ".syn.partial" / "mine.txt").read_text() == "keep"
