"""A map that answers wrongly is refused; a map with a shard down answers in part only when
asked, in process as over Ray; a closed Retriever or shard set refuses every call."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fol_infer.backends import open_encoder
from fol_infer.bundle import Bundle
from fol_infer.cli import app
from fol_infer.errors import IndexStoreError, ShardMismatchError, UsageError
from fol_infer.index.shards import MANIFEST
from fol_infer.pipeline import Retriever, open_shard_set

runner = CliRunner()


def cli(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, " ".join(result.output.split())


def edit_manifest(change: Callable[[list[dict]], None]) -> Callable[[Path], None]:
    def tamper(folder: Path) -> None:
        doc = json.loads((folder / MANIFEST).read_text())
        change(doc["shards"])
        (folder / MANIFEST).write_text(json.dumps(doc))

    return tamper


def shift(shards: list[dict]) -> None:
    for shard in shards:
        shard["offset"] += 5


def overlap(shards: list[dict]) -> None:
    shards[1]["offset"] -= 2


def listed_twice(shards: list[dict]) -> None:
    shards[2] = dict(shards[1], offset=shards[2]["offset"])


def swap_folders(folder: Path) -> None:
    (folder / "shard-00001").rename(folder / "swap")
    (folder / "shard-00002").rename(folder / "shard-00001")
    (folder / "swap").rename(folder / "shard-00002")


def copy_of_another(folder: Path) -> None:
    shutil.rmtree(folder / "shard-00002")
    shutil.copytree(folder / "shard-00001", folder / "shard-00002")


TAMPERINGS = {
    "shifted offsets": (edit_manifest(shift), "shard-00000 starts at global id 5"),
    "overlapping ranges": (edit_manifest(overlap), "shard-00001 starts at global id 14"),
    "a shard listed twice": (edit_manifest(listed_twice), "shard-00001 is listed as shard 2"),
    "swapped folders": (swap_folders, "shard-00001 (global ids 16..26) of map"),
    "a copy of another shard": (copy_of_another, "shard-00002 (global ids 27..37) of map"),
}


@pytest.mark.parametrize("name", TAMPERINGS)
def test_a_tampered_map_is_refused_naming_the_shard(map_builds, tmp_path: Path, name: str) -> None:
    tamper, named = TAMPERINGS[name]
    sharded = Path(shutil.copytree(map_builds.get(shards=3), tmp_path / "map"))
    tamper(sharded)
    for partial in ((), ("--allow-partial",)):
        code, stdout, out = cli("query", sharded, map_builds.queries[0], "--json", *partial)
        assert code == 2 and stdout == "", out
        assert named in out and "rebuild the map: fol-infer index" in out.lower(), out
        assert out.count("error:") == 1 and "Traceback" not in out
    with pytest.raises(ShardMismatchError):
        open_shard_set(sharded)


def test_a_missing_shard_is_left_out_only_when_allowed(map_builds, tmp_path: Path) -> None:
    """In process as over Ray: without --allow-partial the query fails naming the shard;
    with it, the other shards answer and the missing one is named."""
    sharded = Path(shutil.copytree(map_builds.get(shards=3), tmp_path / "map"))
    shutil.rmtree(sharded / "shard-00001")
    query = map_builds.queries[0]
    code, stdout, out = cli("query", sharded, query, "--json")
    assert code == 2 and "shard-00001 (global ids 16..26) of map" in out and "missing" in out
    assert "fol-infer repair" in out and stdout == ""
    partial = ("--allow-partial", "--top-k", "40", "--rerank-k", "3")
    code, stdout, out = cli("query", sharded, query, "--json", *partial)
    assert code == 0, out
    (doc,) = json.loads(stdout)
    assert doc["partial"] is True and doc["missing_shards"] == ["shard-00001"]
    hits = {h["db_index"] for h in doc["global"]}
    assert hits and not hits & set(range(16, 27)) and len(hits) == 38 - 11


def test_every_call_after_close_is_refused(map_builds) -> None:
    bundle = Bundle.open(map_builds.bundle)
    with open_encoder(bundle) as encoder:
        retriever = Retriever(bundle, map_builds.get(shards=3), encoder=encoder)
        assert retriever.query(map_builds.queries[:1])[0].global_hits
        shards = retriever.shards
        retriever.close()
        retriever.close()  # twice is harmless
        with pytest.raises(UsageError, match="this Retriever is closed"):
            retriever.query(map_builds.queries[:1])
        with pytest.raises(UsageError, match="is closed: open it again"):
            shards.search(encoder.encode_global(_batch(bundle, map_builds)).descriptors, 3)
        assert encoder.encode_global(_batch(bundle, map_builds)).descriptors.shape[0] == 1


def _batch(bundle: Bundle, map_builds):
    from fol_infer.images import preprocess

    return preprocess(map_builds.queries[0], bundle.resolution)[None]


def test_a_damaged_shard_is_named_with_its_repair_never_served(map_builds, tmp_path: Path) -> None:
    sharded = Path(shutil.copytree(map_builds.get(shards=3), tmp_path / "map"))
    (sharded / "shard-00000" / "index.json").write_text("{ not json")
    with Retriever(map_builds.bundle, sharded) as retriever:
        with pytest.raises(IndexStoreError, match=r"shard-00000 .*repair: fol-infer repair"):
            retriever.query(map_builds.queries[:1])
