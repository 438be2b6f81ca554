"""Every repair command a damaged index, shard or map prints works as printed: run here as a
user would paste it, then the index or map answers as before the damage."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from test_integrity import flip
from typer.testing import CliRunner

from fol_infer.cli import app
from fol_infer.index.database import DESCRIPTORS, FAISS_FILE, TOKENS
from fol_infer.index.shards import MANIFEST, QUANTIZER

runner = CliRunner()


def cli(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def answers(index: Path, queries: list[Path]) -> str:
    """The query JSON on stdout (notes go to stderr)."""
    args = ["query", index, *queries, "--json", "--top-k", "6", "--rerank-k", "4"]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


def printed_repair(out: str) -> list[str]:
    """The command after "repair:" / "Repair:" / "rebuild it:" in a one-line error, as argv
    without the program name."""
    line = " ".join(out.split())
    found = re.search(
        r"(?:[Rr]epair|rebuild it|[Rr]ebuild the map): (fol-infer .*?)(?: \(|$)", line
    )
    assert found, out
    words = shlex.split(found.group(1))
    assert words[0] == "fol-infer"
    return words[1:]


def damage_then_repair(index: Path, queries: list[Path], damage, expected: str) -> str:
    """Damage, see the query fail with one line naming the repair, run that command as
    printed, and see the same answers again; the repair's own output."""
    damage()
    code, out = cli("query", index, *queries, "--json")
    assert code == 2 and "Traceback" not in out, out
    command = printed_repair(out)
    code, log = cli(*command)
    assert code == 0, log
    assert answers(index, queries) == expected
    code, again = cli(*command)
    assert code == 0 and "nothing damaged" in again, again
    return log


@pytest.fixture()
def index_copy(map_builds, tmp_path: Path) -> Path:
    return Path(shutil.copytree(map_builds.get(), tmp_path / "index"))


@pytest.fixture()
def map_copy(map_builds, tmp_path: Path) -> Path:
    return Path(shutil.copytree(map_builds.get(shards=3), tmp_path / "map"))


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


@pytest.mark.slow
def test_every_repair_printed_for_an_index_works(map_builds, index_copy: Path) -> None:
    queries = map_builds.queries[:2]
    expected = answers(index_copy, queries)
    faiss = index_copy / FAISS_FILE
    log = damage_then_repair(
        index_copy, queries, lambda: flip(faiss, faiss.stat().st_size // 2), expected
    )
    assert "global.faiss rebuilt from the stored descriptors" in log
    ends = index_copy / TOKENS / "ends.bin"
    log = damage_then_repair(index_copy, queries, lambda: flip(ends, 3), expected)
    assert "encoded again" in log
    tokens = index_copy / DESCRIPTORS / "tokens.bin"
    damage_then_repair(index_copy, queries, lambda: truncate(tokens, 1000), expected)


def test_every_repair_printed_for_a_shard_works(map_builds, map_copy: Path) -> None:
    """A flipped global.faiss, a truncated store and a deleted shard folder: each repaired
    by the printed command, after which the map answers as the single index."""
    queries = map_builds.queries[:2]
    expected = answers(map_builds.get(), queries)
    assert answers(map_copy, queries) == expected
    faiss = map_copy / "shard-00001" / FAISS_FILE
    log = damage_then_repair(
        map_copy, queries, lambda: flip(faiss, faiss.stat().st_size // 2), expected
    )
    assert "shard-00001: global.faiss rebuilt" in log
    tokens = map_copy / "shard-00002" / TOKENS / "tokens.bin"
    log = damage_then_repair(map_copy, queries, lambda: truncate(tokens, 100), expected)
    assert "shard-00002: encoded again" in log
    log = damage_then_repair(
        map_copy, queries, lambda: shutil.rmtree(map_copy / "shard-00000"), expected
    )
    assert "shard-00000: encoded again from the 16 files map.json records" in log
    for entry in ("shard-00000", "shard-00002"):  # byte for byte what the build wrote
        for store in (DESCRIPTORS, TOKENS):
            name = f"{entry}/{store}/tokens.bin"
            built = (map_builds.get(shards=3) / name).read_bytes()
            assert (map_copy / name).read_bytes() == built, name


@pytest.mark.slow
def test_a_trained_maps_quantizer_is_trained_again(map_builds, tmp_path: Path) -> None:
    sharded = Path(shutil.copytree(map_builds.get(factory="IVF4,Flat", shards=3), tmp_path / "m"))
    queries = map_builds.queries[:2]
    expected = answers(map_builds.get(factory="IVF4,Flat"), queries)
    quantizer = sharded / QUANTIZER
    flip(quantizer, quantizer.stat().st_size // 2)
    code, log = cli("repair", sharded)
    assert code == 0, log
    assert "quantizer.faiss: trained again" in log and "shard-00002: global.faiss rebuilt" in log
    assert answers(sharded, queries) == expected


def test_a_tampered_map_prints_a_rebuild_that_works(map_builds, map_copy: Path) -> None:
    """A shard folder replaced by a copy of another, and map.json with shifted offsets: each
    refused naming the shard; the printed rebuild gives the single index's answers."""
    queries = map_builds.queries[:2]
    expected = answers(map_builds.get(), queries)
    manifest = json.loads((map_copy / MANIFEST).read_text())
    manifest["shards"][1]["offset"] += 1
    (map_copy / MANIFEST).write_text(json.dumps(manifest))
    code, out = cli("query", map_copy, *queries)
    assert code == 2 and "shard-00001 starts at global id 17" in out, out
    manifest["shards"][1]["offset"] -= 1
    (map_copy / MANIFEST).write_text(json.dumps(manifest))
    shutil.rmtree(map_copy / "shard-00002")
    shutil.copytree(map_copy / "shard-00001", map_copy / "shard-00002")
    code, out = cli("query", map_copy, *queries, "--allow-partial")
    assert code == 2 and "shard-00002" in out and "does not hold what map.json records" in out
    code, log = cli(*printed_repair(out))
    assert code == 0, log
    assert answers(map_copy, queries) == expected
