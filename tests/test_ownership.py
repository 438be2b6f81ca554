"""`--force` replaces only what fol-infer made, and never a folder holding the command's input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sample_images import make_images
from typer.testing import CliRunner

from fol_infer.bundle import PRODUCT as BUNDLE
from fol_infer.cli import app
from fol_infer.errors import UsageError
from fol_infer.files.ownership import check_replaceable, is_product
from fol_infer.index.database import METADATA
from fol_infer.index.database import PRODUCT as INDEX

runner = CliRunner()


def index_cli(bundle: Path, db: Path, out: Path, *flags: str) -> tuple[int, str]:
    result = runner.invoke(app, ["index", str(bundle), str(db), "--out", str(out), *flags])
    return result.exit_code, " ".join(result.output.split())  # rich wraps long lines


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_index_force_refuses_a_users_folder_and_the_database(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    db = tmp_path / "db"
    make_images(db, 2)
    mine = tmp_path / "myresults"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own work")
    (db / "sub").mkdir()
    make_images(db / "sub", 1, seed=3)
    before_db, before_mine = snapshot(db), snapshot(mine)

    code, out = index_cli(tiny_bundle, db, mine)  # without --force: --force is not suggested
    assert code == 2 and "is not a fol-infer index: choose another --out" in out
    assert "pass --force" not in out
    for target, relation in [
        (mine, "not a fol-infer index"),
        (db, "it is the database folder"),
        (db / "sub", "it is inside the database folder"),
        (tmp_path, "it contains the database folder"),
        (tiny_bundle, "the bundle"),
    ]:
        code, out = index_cli(tiny_bundle, db, target, "--force")
        assert code == 2, out
        assert "refusing to replace" in out and relation in out, out
        assert out.count("error:") == 1 and "Traceback" not in out
    assert snapshot(db) == before_db and snapshot(mine) == before_mine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db", "myresults"]  # no lock left

    code, out = index_cli(tiny_bundle, db, tmp_path / "idx")
    assert code == 0, out
    code, out = index_cli(tiny_bundle, db, tmp_path / "idx")
    assert code == 2 and "--append" in out and "--force" in out  # an index: both apply
    code, out = index_cli(tiny_bundle, db, tmp_path / "idx", "--force")
    assert code == 0 and "3 images indexed" in out, out


def test_products_are_recognised_by_their_markers_not_their_names(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    assert is_product(tiny_bundle, BUNDLE) and not is_product(tiny_bundle, INDEX)
    fake = tmp_path / "engines-vitb14-322"  # a bundle-like name, a user's content
    fake.mkdir()
    (fake / "manifest.json").write_text(json.dumps({"name": "my shipping manifest"}))
    assert not is_product(fake, BUNDLE)
    with pytest.raises(UsageError, match="not a fol-infer bundle"):
        check_replaceable(fake, BUNDLE, {})
    legacy = tmp_path / "legacy"  # a bundle written before the format marker
    legacy.mkdir()
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    del manifest["format"]
    (legacy / "manifest.json").write_text(json.dumps(manifest))
    assert is_product(legacy, BUNDLE)
    damaged = tmp_path / "idx"  # an index whose index.json is damaged can still be rebuilt
    (damaged / "descriptors").mkdir(parents=True)
    (damaged / METADATA).write_text("{not json")
    (damaged / "descriptors" / "commit.json").write_text(
        json.dumps({"format": "fol-infer-token-store"})
    )
    assert is_product(damaged, INDEX)
    check_replaceable(damaged, INDEX, {})
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", INDEX, {})  # nothing to lose
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="it is a file"):
        check_replaceable(tmp_path / "file", INDEX, {})
