"""Every file a command writes is refused, before any work, where it would destroy an input
(or a link to one, or a file inside an input folder), another output of the same command, or
cannot be written; a full disk keeps every old output. Inputs are hashed before and after."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from full_disk import full_disk_for
from PIL import Image
from sample_images import make_images
from typer.testing import CliRunner

from fol_infer.cli import app
from fol_infer.errors import UsageError
from fol_infer.files.ownership import check_outputs

REPORT = Path(__file__).resolve().parents[1] / "benchmarks/results/bench_default_torch_epyc2.json"


class Work:
    """One index, one map of two shards and the files a user points commands at, built once."""

    def __init__(self, root: Path, bundle: Path) -> None:
        self.root, self.bundle = root, bundle
        self.db, self.queries = root / "db", root / "queries"
        make_images(self.db, 4)
        self.query_files = make_images(self.queries, 2, seed=7)
        self.single = make_images(root / "one", 1, seed=8)[0]
        self.png = root / "photo.png"
        Image.open(self.single).save(self.png)
        self.report = root / "report.svg"  # a bench report under a figure's name
        self.report.write_text(REPORT.read_text())
        self.positions = root / "pos.csv"
        self.positions.write_text("path,easting,northing\nqueries/x.jpg,1,2\n")
        self.dataset = root / "dataset"
        make_images(self.dataset / "database", 2)
        make_images(self.dataset / "queries", 1, seed=9)
        (root / "a-folder").mkdir()
        (root / "link.csv").symlink_to(self.single)
        os.link(self.single, root / "hard.csv")
        self.index, self.map = root / "idx", root / "map"
        for out, extra in ((self.index, []), (self.map, ["--shards", "2", "--batch", "2"])):
            result = CliRunner().invoke(
                app, ["index", str(bundle), str(self.db), "--out", str(out), *extra]
            )
            assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def work(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Work:
    return Work(tmp_path_factory.mktemp("outputs"), tiny_bundle)


def snapshot(*folders: Path) -> dict[str, str]:
    """Every entry (temporaries included) with the sha256 of each file's bytes."""
    found = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            found[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return found


CASES: list[tuple[str, Callable[[Work], list[object]], str]] = [
    ("query --csv-out over a query image", lambda w: [
        "query", w.index, w.single, "--csv-out", w.single], "it is the query image"),
    ("query --csv-out inside the query folder", lambda w: [
        "query", w.index, w.queries, "--csv-out", w.queries / "r.csv"],
        "is inside the query folder"),
    ("query --pairs-out over index.json", lambda w: [
        "query", w.index, w.single, "--pairs-out", w.index / "index.json"], "inside the index"),
    ("query --csv-out over map.json", lambda w: [
        "query", w.map, w.single, "--csv-out", w.map / "map.json"], "it is inside the map"),
    ("query --csv-out in the database folder", lambda w: [
        "query", w.index, w.single, "--csv-out", w.db / "r.csv"], "inside the database folder"),
    ("query --csv-out over the bundle's manifest", lambda w: [
        "query", w.index, w.single, "--csv-out", w.bundle / "manifest.json"], "inside the bundle"),
    ("query --csv-out: a symbolic link to a query image", lambda w: [
        "query", w.index, w.single, "--csv-out", w.root / "link.csv"],
        "is a link to the query image"),
    ("query --csv-out: a hard link to a query image", lambda w: [
        "query", w.index, w.single, "--csv-out", w.root / "hard.csv"],
        "is a link to the query image"),
    ("query --csv-out and --pairs-out: one file", lambda w: [
        "query", w.index, w.single, "--pairs-out", w.root / "o.txt", "--csv-out", w.root / "o.txt"],
        "--csv-out and --pairs-out are the same file"),
    ("query --csv-out: a folder", lambda w: [
        "query", w.index, w.single, "--csv-out", w.root / "a-folder"], "is a folder"),
    ("query --csv-out: no such folder", lambda w: [
        "query", w.index, w.single, "--csv-out", w.root / "nowhere" / "r.csv"], "does not exist"),
    ("show regions --out over the image", lambda w: [
        "show", "regions", w.bundle, w.png, "--out", w.png], "it is the image"),
    ("show matches --out over the candidate", lambda w: [
        "show", "matches", w.bundle, w.single, w.png, "--out", w.png], "the candidate image"),
    ("show results --out inside the index", lambda w: [
        "show", "results", w.index, w.single, "--out", w.index / "f.png"], "inside the index"),
    ("show bench --out over the report", lambda w: [
        "show", "bench", w.report, "--out", w.report], "it is the report"),
    ("bench --json-out inside the dataset", lambda w: [
        "bench", "--bundle", w.bundle, "--dataset", w.dataset, "--json-out", w.dataset / "r.json"],
        "inside the dataset"),
    ("bench --markdown-out over the positions CSV", lambda w: [
        "bench", "--bundle", w.bundle, "--dataset", w.dataset, "--positions", w.positions,
        "--markdown-out", w.positions], "it is the positions CSV"),
    ("bench --json-out and --markdown-out: one file", lambda w: [
        "bench", "--bundle", w.bundle, "--dataset", w.dataset, "--json-out", w.root / "r",
        "--markdown-out", w.root / "r"], "--markdown-out and --json-out are the same file"),
    ("encode --out inside the image folder", lambda w: [
        "encode", w.bundle, w.queries, "--out", w.queries / "e.npz"], "inside the image folder"),
    ("make-checkpoint OUT: a folder", lambda w: [
        "make-checkpoint", w.root / "a-folder", "--arch", "tiny"], "is a folder"),
    ("make-checkpoint OUT: no such folder", lambda w: [
        "make-checkpoint", w.root / "nowhere" / "c.pth", "--arch", "tiny"], "does not exist"),
    ("build-trt --timing-cache inside the bundle", lambda w: [
        "build-trt", w.bundle, "--timing-cache", w.bundle / "manifest.json"], "inside the bundle"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "argv", "message"), CASES, ids=[c[0] for c in CASES])
def test_an_output_that_would_destroy_an_input_is_refused_before_any_work(
    work: Work, what: str, argv: Callable[[Work], list[object]], message: str
) -> None:
    before = snapshot(work.root, work.bundle)
    result = CliRunner().invoke(app, [str(a) for a in argv(work)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output  # no banner: no work began
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert snapshot(work.root, work.bundle) == before  # every byte, and no file left behind


def test_a_full_disk_writes_no_output_and_keeps_the_old_ones(
    work: Work, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs, rows, figure = tmp_path / "p.txt", tmp_path / "r.csv", tmp_path / "f.png"
    for path in (pairs, rows, figure):
        path.write_bytes(b"yesterday's " + path.name.encode())
    before = snapshot(tmp_path, work.root)
    full_disk_for("r.csv", monkeypatch)
    argv = ["query", str(work.index), str(work.single), "--pairs-out", str(pairs),
            "--csv-out", str(rows), "--reranker", "cpu"]  # fmt: skip
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 1, result.output
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert line == f"error: cannot write {rows}: No space left on device"
    full_disk_for("f.png", monkeypatch)
    result = CliRunner().invoke(app, ["show", "regions", str(work.bundle), str(work.png),
                                      "--out", str(figure)])  # fmt: skip
    assert result.exit_code == 1 and "No space left on device" in result.output
    assert "Traceback" not in result.output
    assert snapshot(tmp_path, work.root) == before  # old bytes, no temporary, no half file
    monkeypatch.undo()
    assert CliRunner().invoke(app, argv).exit_code == 0  # the same command, with room
    assert pairs.read_text().startswith(work.single.name) and rows.read_text().startswith("query")


def test_check_outputs_names_what_it_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "q.jpg"
    image.write_bytes(b"jpeg")
    check_outputs({"--csv": tmp_path / "r.csv", "--json": None}, {"query image": image})
    with pytest.raises(UsageError, match=r"refusing to write --csv .*: it is the query image"):
        check_outputs({"--csv": image}, [("query image", image)])
    (tmp_path / "out.csv").symlink_to(image)
    with pytest.raises(UsageError, match="it is a link to the query image"):
        check_outputs({"--csv": tmp_path / "out.csv"}, {"query image": image})
    with pytest.raises(UsageError, match="--b and --a are the same file"):
        check_outputs({"--a": tmp_path / "x", "--b": tmp_path / "sub" / ".." / "x"})
    monkeypatch.setattr(os, "access", lambda *args: False)  # as for a user without rights
    with pytest.raises(UsageError, match=f"the folder {tmp_path} is not writable"):
        check_outputs({"--csv": tmp_path / "r.csv"})
