"""`fol-infer query` outputs for the next tool: hloc pairs, CSV rows, JSON files that open."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest
from sample_images import make_images
from typer.testing import CliRunner

from fol_infer import rerank
from fol_infer.cli import app
from fol_infer.errors import UsageError
from fol_infer.outputs import CSV_COLUMNS, pairs_text, query_names
from fol_infer.pipeline import QueryResult, RerankHit


@pytest.fixture(scope="module")
def index_dir(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("outputs")
    make_images(root / "db" / "street", 5)
    result = CliRunner().invoke(
        app, ["index", str(tiny_bundle), str(root / "db"), "--out", str(root / "idx")]
    )
    assert result.exit_code == 0, result.output
    return root / "idx"


def test_pairs_csv_and_json_agree_and_open_from_anywhere(
    index_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    queries = tmp_path / "queries"
    make_images(queries / "day", 2, seed=3)
    pairs, table = tmp_path / "pairs.txt", tmp_path / "results.csv"
    monkeypatch.setattr(rerank, "_fallback_noted", False)
    argv = ["query", str(index_dir), str(queries), "--top-k", "3", "--rerank-k", "4", "--json",
            "--pairs-out", str(pairs), "--csv", str(table)]  # fmt: skip
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    docs = json.loads(result.stdout)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the files must open from any working directory
    expected_pairs, expected_rows = [], []
    for doc in docs:
        assert os.path.isabs(doc["database_root"])
        name = Path(doc["query"]).relative_to(queries).as_posix()  # e.g. day/@...jpg
        assert name.startswith("day/")
        for hit in doc["reranked"]:
            assert os.path.isabs(hit["file"]) and Path(hit["file"]).is_file()
            assert hit["file"] == os.path.join(doc["database_root"], hit["path"])
            assert hit["path"].startswith("street/")  # the index's name, relative to the root
            expected_pairs.append(f"{name} {hit['path']}")
            expected_rows.append((doc["query"], str(hit["rank"]), hit["path"], str(hit["matches"])))
        assert [h["rank"] for h in doc["reranked"]] == [1, 2, 3]
    assert pairs.read_text().splitlines() == expected_pairs  # re-ranked order, 3 per query
    rows = list(csv.DictReader(io.StringIO(table.read_text())))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [(r["query"], r["rank"], r["path"], r["matches"]) for r in rows] == expected_rows
    assert all(Path(r["file"]).is_file() for r in rows)
    if not os.path.exists("/dev/nvidiactl"):  # the CPU fallback is expected here: one note
        assert result.stderr.count("note: re-ranking on the CPU") == 1
        assert "warning" not in result.stderr.lower()


def test_global_only_pairs_follow_the_global_order(index_dir: Path, tmp_path: Path) -> None:
    (query,) = make_images(tmp_path / "q", 1, seed=4)
    pairs = tmp_path / "pairs.txt"
    argv = ["query", str(index_dir), str(query), "--top-k", "2", "--no-rerank", "--json",
            "--pairs-out", str(pairs), "--csv", str(tmp_path / "r.csv")]  # fmt: skip
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    (doc,) = json.loads(result.stdout)
    assert pairs.read_text().splitlines() == [f"{query.name} {h['path']}" for h in doc["global"]]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text())))
    assert [r["matches"] for r in rows] == ["", ""] and all(float(r["global_score"]) for r in rows)


def test_names_with_whitespace_cannot_go_into_hloc_pairs(tmp_path: Path) -> None:
    result = QueryResult("q.jpg", [], [RerankHit(1, 0, "my photo.jpg", 3)], database_root="/db")
    with pytest.raises(UsageError, match="'my photo.jpg' contains whitespace"):
        pairs_text([result], ["q.jpg"])
    folder = tmp_path / "qs"
    (folder / "a").mkdir(parents=True)
    files = [folder / "a" / "x.jpg", tmp_path / "y.jpg"]
    assert query_names(files, [folder, files[1]]) == ["a/x.jpg", "y.jpg"]
