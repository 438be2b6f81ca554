"""Skipped images are retried once they change; non-UTF-8 file names round-trip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from sample_images import make_images
from typer.testing import CliRunner

from fol_infer.cli import app
from fol_infer.files.names import printable
from fol_infer.index.database import METADATA, Database
from fol_infer.index.metadata import IndexMetadata

runner = CliRunner()
CLI = "import sys; from fol_infer.cli import main; sys.argv[0] = 'fol-infer'; main()"


def cli(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, " ".join(result.output.split())


def test_a_skipped_image_is_retried_once_it_changes(tiny_bundle: Path, tmp_path: Path) -> None:
    db, idx = tmp_path / "db", tmp_path / "idx"
    make_images(db, 2)
    late = db / "late.jpg"
    late.write_bytes(b"")
    code, out = cli("index", tiny_bundle, db, "--out", idx)
    assert code == 0 and "skipped late.jpg: " in out and "1 skipped" in out, out
    code, out = cli("index", tiny_bundle, db, "--out", idx, "--append")
    assert code == 0 and "retried" not in out and "0 added" in out, out  # unchanged: not retried
    shutil.copy(next(db.glob("@*.jpg")), late)  # re-copied
    code, out = cli("index", tiny_bundle, db, "--out", idx, "--append")
    assert code == 0, out
    assert "retried late.jpg: failed before and changed since" in out and "1 added" in out
    meta = IndexMetadata.load(idx / METADATA)
    assert "late.jpg" in meta.paths and meta.failures == [] and meta.failure_stamps == {}


def run_cli(*args: str | Path) -> tuple[int, str, str]:
    """A real process, with real (not captured-in-Python) stdout and stderr pipes."""
    proc = subprocess.run(
        [sys.executable, "-c", CLI, *map(str, args)], capture_output=True, timeout=300
    )
    out, err = (s.decode("utf-8", "surrogateescape") for s in (proc.stdout, proc.stderr))
    return proc.returncode, out + err, out


def test_non_utf8_file_names_round_trip(tiny_bundle: Path, tmp_path: Path) -> None:
    db, idx = tmp_path / "db", tmp_path / "idx"
    make_images(db, 2)
    bad = db / os.fsdecode(b"bad\xff.jpg")
    shutil.copy(next(db.glob("@*.jpg")), bad)
    (db / os.fsdecode(b"worse\xfe.jpg")).write_bytes(b"not a picture")
    assert os.fsencode(bad.name) == b"bad\xff.jpg" and bad.is_file()

    code, out, _ = run_cli("index", tiny_bundle, db, "--out", idx)
    assert code == 0 and "Traceback" not in out, out
    assert "skipped worse\\xfe.jpg" in " ".join(out.split())
    meta = IndexMetadata.load(idx / METADATA)  # index.json keeps the exact bytes
    assert bad.name in meta.paths and b'"bad\\udcff.jpg"' in (idx / METADATA).read_bytes()
    with Database(idx) as database:
        assert database.absolute_path(database.paths.index(bad.name)) == bad

    code, out, _ = run_cli("query", idx, bad, "--top-k", "3", "--rerank-k", "3")
    assert code == 0 and "Traceback" not in out, out
    assert printable(str(bad)) in out and "bad\\xff.jpg (" in out  # the table's hit
    code, out, stdout = run_cli("query", idx, bad, "--top-k", "3", "--json", "--no-rerank")
    assert code == 0, out
    (result,) = json.loads(stdout)
    assert os.fsencode(result["query"]) == os.fsencode(str(bad))
    assert bad.name in [hit["path"] for hit in result["global"]]
    assert result["global"][0]["path"] == bad.name  # the image finds itself first
