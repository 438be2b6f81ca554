"""One writer per index, across real processes; readers never see (or cut) a half-commit."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
from sample_images import make_images

from fol_infer.backends import open_encoder
from fol_infer.bundle import Bundle
from fol_infer.images import preprocess
from fol_infer.index.build import build_index
from fol_infer.index.database import DESCRIPTORS, METADATA, Database
from fol_infer.index.lock import IndexBusyError, WriterLock, lock_path
from fol_infer.index.token_store import COMMIT, TokenStore

CLI = "import sys; from fol_infer.cli import main; sys.argv[0] = 'fol-infer'; main()"


def start_cli(*args: str | Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", CLI, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    out = proc.communicate(timeout=300)[0].decode()
    return proc.returncode, " ".join(out.split())


def test_a_second_writer_is_refused_before_it_writes(tiny_bundle: Path, tmp_path: Path) -> None:
    make_images(tmp_path / "db", 2)
    idx = tmp_path / "idx"
    assert finish(start_cli("index", tiny_bundle, tmp_path / "db", "--out", idx))[0] == 0
    make_images(tmp_path / "db", 3)  # one more image to append
    before = (idx / METADATA).read_bytes(), (idx / DESCRIPTORS / COMMIT).read_bytes()
    with WriterLock(idx):  # this test process is the first writer
        code, out = finish(
            start_cli("index", tiny_bundle, tmp_path / "db", "--out", idx, "--append")
        )
        with WriterLock(idx):  # the holding thread may take it again (a nested step)
            pass
        refused: list[BaseException] = []

        def second_writer() -> None:  # another thread of this process is another writer
            try:
                with WriterLock(idx):
                    pass
            except IndexBusyError as exc:
                refused.append(exc)

        thread = threading.Thread(target=second_writer)
        thread.start()
        thread.join()
        assert len(refused) == 1 and f"pid {os.getpid()}" in str(refused[0])
    assert code == 3, out
    assert f"{idx} is being written by another fol-infer process (pid {os.getpid()}" in out
    assert "nothing was written" in out and "--wait" in out and "Traceback" not in out
    assert ((idx / METADATA).read_bytes(), (idx / DESCRIPTORS / COMMIT).read_bytes()) == before
    assert not lock_path(idx).exists()  # the holder removed it as it let go


def test_concurrent_appends_serialise_and_every_image_is_named_right(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """The reported race: one append adds 1 image, another 4 with --batch 4, at once."""
    make_images(tmp_path / "db", 2)
    idx = tmp_path / "idx"
    assert finish(start_cli("index", tiny_bundle, tmp_path / "db", "--out", idx))[0] == 0
    one = make_images(tmp_path / "one", 1, seed=5)
    four = make_images(tmp_path / "four", 4, seed=6)
    procs = [
        start_cli("index", tiny_bundle, tmp_path / "one", "--out", idx, "--append", "--wait"),
        start_cli(
            "index", tiny_bundle, tmp_path / "four", "--out", idx, "--append", "--wait",
            "--batch", "4",
        ),
    ]  # fmt: skip
    results = [finish(p) for p in procs]
    assert [code for code, _ in results] == [0, 0], results
    bundle = Bundle.open(tiny_bundle)
    with Database(idx, bundle=bundle) as database, open_encoder(bundle) as encoder:
        assert len(database) == 7 and len(set(database.paths)) == 7
        assert len(database.tokens) == 7 and len(database.global_index) == 7
        for image in one + four:
            i = database.paths.index(str(image.resolve()))
            want = encoder.encode(preprocess(image, bundle.resolution)[None])
            stored = TokenStore.open(idx / DESCRIPTORS)
            try:
                np.testing.assert_allclose(stored.get([i])[0][0], want.descriptors[0], atol=1e-5)
            finally:
                stored.close()
            np.testing.assert_allclose(
                database.tokens.get([i])[0].astype(np.float32), want.token_list()[0], atol=2e-3
            )


def test_a_reader_leaves_uncommitted_rows_alone(tiny_bundle: Path, tmp_path: Path) -> None:
    """A reader opening while a writer has committed a store batch but not yet index.json
    serves the committed images and writes nothing (the writer's batch stays)."""
    bundle = Bundle.open(tiny_bundle)
    make_images(tmp_path / "db", 2)
    with open_encoder(bundle) as encoder:
        build_index(bundle, encoder, tmp_path / "db", tmp_path / "idx")
    store = TokenStore.open(tmp_path / "idx" / "tokens")
    store.append([np.ones((3, 128), np.float32)])  # the writer, between commits
    store.close()
    record = (tmp_path / "idx" / "tokens" / COMMIT).read_bytes()
    with Database(tmp_path / "idx") as database:
        assert len(database) == 2 and len(database.tokens) == 2
    assert (tmp_path / "idx" / "tokens" / COMMIT).read_bytes() == record
