"""`fol-infer query` outputs for the next tool: hloc pairs, CSV rows, JSON files that open."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from sample_images import make_images
from typer.testing import CliRunner

from fol_infer.cli import app
from fol_infer.errors import UsageError
from fol_infer.outputs import CSV_COLUMNS, csv_text, pairs_text, query_names
from fol_infer.pipeline import GlobalHit, QueryResult, RerankHit
from fol_infer.rerank import dispatch as rerank


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
            "--pairs-out", str(pairs), "--csv-out", str(table)]  # fmt: skip
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
            "--pairs-out", str(pairs), "--csv-out", str(tmp_path / "r.csv")]  # fmt: skip
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


@pytest.fixture(scope="module")
def map_dir(tiny_bundle: Path, index_dir: Path) -> Path:
    """The same database as a map of two shards."""
    db, out = index_dir.parent / "db", index_dir.parent / "map"
    argv = ["index", str(tiny_bundle), str(db), "--out", str(out), "--shards", "2", "--batch", "2"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    return out


def rows_of(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_every_output_holds_top_k_of_the_final_order(index_dir: Path, tmp_path: Path) -> None:
    """--top-k 5 --rerank-k 2: five rows and pairs per query, the two re-ranked first (with
    their counts), then the global list without them (no count), and a note says so."""
    (query,) = make_images(tmp_path / "q", 1, seed=6)
    pairs, table = tmp_path / "p.txt", tmp_path / "r.csv"
    argv = ["query", str(index_dir), str(query), "--top-k", "5", "--rerank-k", "2", "--json",
            "--pairs-out", str(pairs), "--csv-out", str(table), "--reranker", "cpu"]  # fmt: skip
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "--rerank-k 2 < --top-k 5" in result.stderr
    (doc,) = json.loads(result.stdout)
    head = [h["path"] for h in doc["reranked"]]
    final = head + [h["path"] for h in doc["global"] if h["path"] not in head]
    assert len(head) == 2 and len(final) == 5
    rows = rows_of(table)
    assert [r["path"] for r in rows] == final and [r["rank"] for r in rows] == list("12345")
    assert [r["matches"] for r in rows] == [str(h["matches"]) for h in doc["reranked"]] + [""] * 3
    assert all(r["global_score"] for r in rows[2:]) and not any(r["missing_shards"] for r in rows)
    assert pairs.read_text().splitlines() == [f"{query.name} {p}" for p in final]


def test_a_partial_answer_is_marked_in_every_output(map_dir: Path, tmp_path: Path) -> None:
    """The map's second shard is missing: the table's title, the CSV and the JSON say so,
    stderr names the shard whatever the format; without --allow-partial, an error, no file."""
    sharded = Path(shutil.copytree(map_dir, tmp_path / "map"))
    down = json.loads((sharded / "map.json").read_text())["shards"][1]["name"]
    shutil.rmtree(sharded / down)
    (query,) = make_images(tmp_path / "q", 1, seed=6)
    pairs, table = tmp_path / "p.txt", tmp_path / "r.csv"
    base = ["query", str(sharded), str(query), "--top-k", "3", "--rerank-k", "3", "--reranker",
            "cpu", "--allow-partial"]  # fmt: skip
    warning = f"warning: PARTIAL answers for 1 of 1 queries: shards {down} did not answer"
    shown = CliRunner().invoke(app, [*base, "--csv-out", str(table), "--pairs-out", str(pairs)])
    assert shown.exit_code == 0, shown.output
    assert warning in shown.stderr and f"[PARTIAL: shards {down} did not answer]" in shown.stdout
    rows = rows_of(table)
    assert rows and all(r["missing_shards"] == down for r in rows)
    assert len(pairs.read_text().splitlines()) == len(rows)  # allowed: --allow-partial
    as_json = CliRunner().invoke(app, [*base, "--json"])
    assert as_json.exit_code == 0 and warning in as_json.stderr
    (doc,) = json.loads(as_json.stdout)
    assert doc["partial"] is True and doc["missing_shards"] == [down]
    pairs.unlink()
    refused = CliRunner().invoke(app, [*base[:-1], "--pairs-out", str(pairs)])
    assert refused.exit_code == 2 and f"{down}" in refused.output and "missing" in refused.output
    assert not pairs.exists()


def test_a_partial_answer_goes_into_pairs_only_when_allowed() -> None:
    result = QueryResult("q.jpg", [GlobalHit(1, 0, "a.jpg", 0.9)], None, database_root="/db")
    result.missing_shards = ["shard-0001"]
    with pytest.raises(UsageError, match=r"partial \(shards shard-0001 did not answer\)"):
        pairs_text([result], ["q.jpg"])
    assert pairs_text([result], ["q.jpg"], allow_partial=True) == "q.jpg a.jpg\n"
    assert csv_text([result]).splitlines()[1].endswith(",0.900000,,shard-0001")


def test_query_names_are_unique_and_collisions_refused_before_work(
    index_dir: Path, tmp_path: Path
) -> None:
    for side in ("a", "b"):
        make_images(tmp_path / side, 1, seed=4)  # the same file name in two folders
    (name,) = {p.name for p in (tmp_path / "a").iterdir()}
    a, b, pairs = tmp_path / "a" / name, tmp_path / "b" / name, tmp_path / "p.txt"
    argv = ["query", str(index_dir), str(a), str(b), "--top-k", "1", "--no-rerank"]
    result = CliRunner().invoke(app, [*argv, "--pairs-out", str(pairs)])
    assert result.exit_code == 0, result.output
    assert [line.split()[0] for line in pairs.read_text().splitlines()] == [
        f"a/{name}",
        f"b/{name}",
    ]  # relative to their common folder, as hloc names them
    pairs.unlink()
    result = CliRunner().invoke(
        app, ["query", str(index_dir), str(tmp_path / "a"), str(b), "--pairs-out", str(pairs)]
    )
    lines = result.output.splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output  # refused before any work
    assert f"both be named '{name}'" in lines[0] and str(a) in lines[0] and str(b) in lines[0]
    assert "give them from one folder, or rename one" in lines[0] and not pairs.exists()


def test_names_hloc_cannot_read_are_refused_naming_them(index_dir: Path, tmp_path: Path) -> None:
    (image,) = make_images(tmp_path / "q", 1, seed=4)
    odd = image.with_name(os.fsdecode(b"q\xff.jpg"))  # not UTF-8: kept as '\udcff'
    image.rename(odd)
    pairs = tmp_path / "p.txt"
    result = CliRunner().invoke(app, ["query", str(index_dir), str(odd), "--pairs-out", str(pairs)])
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1, result.output
    assert "'q\\xff.jpg' is not valid UTF-8" in result.output and not pairs.exists()
    hit = RerankHit(1, 0, os.fsdecode(b"bad\xfe.jpg"), 3)
    result_ = QueryResult("q.jpg", [], [hit], database_root="/db")
    with pytest.raises(UsageError, match=r"'bad\\xfe.jpg' is not valid UTF-8"):
        pairs_text([result_], ["q.jpg"])
