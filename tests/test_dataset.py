"""Benchmark datasets: the standard layout, UTM ground truth, Recall@N, the synthetic generator."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import fol_infer.cli.make_dataset_command  # noqa: F401  (registers make-dataset on the app)
from fol_infer.bench.dataset import LAYOUT_TREE, open_dataset
from fol_infer.bench.recall import recall_at
from fol_infer.bench.synthetic import SyntheticPlan, make_dataset, plan_dataset
from fol_infer.cli.app import app
from fol_infer.errors import UsageError
from fol_infer.images import load_rgb
from fol_infer.positions import positives

SMALL = (96, 128)  # (height, width): fast, still every drawing step
LABEL = re.compile(r"@(place\d+|distractor\d+)")


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def place(path: Path) -> str:
    match = LABEL.search(path.name)
    assert match is not None, path
    return match.group(1)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "ds"
    return make_dataset(out, places=6, queries_per_place=3, distractors=4, seed=5, size=SMALL)


# ---------------------------------------------------------------- the generator


def test_same_seed_same_bytes_other_seed_other_bytes(synthetic: Path, tmp_path: Path) -> None:
    again = make_dataset(tmp_path / "a", 6, 3, 4, seed=5, size=SMALL)
    other = make_dataset(tmp_path / "b", 6, 3, 4, seed=6, size=SMALL)
    assert files(again) == files(synthetic)
    jpegs = {k: v for k, v in files(other).items() if k.endswith(".jpg")}
    assert set(jpegs.values()).isdisjoint(files(synthetic).values())


def test_layout_counts_and_images(synthetic: Path) -> None:
    ds = open_dataset(synthetic)
    plan = plan_dataset(6, 3, 4, seed=5, size=SMALL)
    assert ds.synthetic and ds.positions_unavailable is None
    assert ds.layout.database_dir == synthetic / "images" / "test" / "database"
    assert len(ds.queries) == 6 * 3 == sum(v.query for v in plan.views)
    assert len(ds.database) == len(plan.views) - len(ds.queries)
    assert {place(p) for p in ds.queries} == {f"place{i:04d}" for i in range(6)}
    assert sum(place(p).startswith("distractor") for p in ds.database) == 4
    assert ds.database == sorted(ds.database, key=lambda p: p.parts)
    for path in (ds.database[0], ds.queries[-1]):
        assert load_rgb(path).shape == (*SMALL, 3)
    assert "says nothing about FoL's accuracy" in (synthetic / "README.txt").read_text()


def test_positives_are_exactly_the_own_place_database_views(synthetic: Path) -> None:
    ds = open_dataset(synthetic)
    truth = ds.positives()
    assert truth is not None
    for query, found in zip(ds.queries, truth, strict=True):
        own = [i for i, p in enumerate(ds.database) if place(p) == place(query)]
        assert own and found.tolist() == own
    # Different places and distractors lie far apart, not just beyond 25 m.
    assert ds.database_positions is not None
    utm = ds.database_positions.coords
    labels = np.array([place(p) for p in ds.database])
    gaps = np.hypot(*(utm[:, None, :] - utm[None, :, :]).transpose(2, 0, 1))
    assert gaps[labels[:, None] != labels[None, :]].min() >= 200


def test_existing_output_needs_force_and_force_spares_real_data(tmp_path: Path) -> None:
    out = make_dataset(tmp_path / "ds", 1, 1, 0, size=SMALL)
    with pytest.raises(UsageError, match="--force"):
        make_dataset(out, 1, 1, 0, size=SMALL)
    make_dataset(out, 2, 1, 0, size=SMALL, force=True)
    assert len(open_dataset(out).queries) == 2
    real = tmp_path / "real"
    real.mkdir()
    (real / "photo.jpg").write_bytes(b"mine")
    with pytest.raises(UsageError, match="refusing"):
        make_dataset(real, 1, 1, 0, size=SMALL, force=True)
    assert (real / "photo.jpg").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "real"]  # no leftovers


@pytest.mark.parametrize(
    "kwargs", [{"places": 0}, {"queries_per_place": 0}, {"distractors": -1}, {"seed": -1}]
)
def test_bad_generator_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        plan_dataset(**kwargs)


def test_plan_defaults_distractors_to_places() -> None:
    plan: SyntheticPlan = plan_dataset(places=3, queries_per_place=1)
    assert plan.distractors == 3
    assert sum(v.name.startswith("database/@") and "distractor" in v.name for v in plan.views) == 3


# ---------------------------------------------------------------- opening real layouts


def write_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (8, 8)).save(folder / name)


def test_other_roots_downloaders_write(synthetic: Path, tmp_path: Path) -> None:
    direct = open_dataset(synthetic / "images" / "test")
    assert direct.database == open_dataset(synthetic).database
    assert direct.synthetic  # the README two levels up is still found
    msls = tmp_path / "msls"
    shutil.copytree(synthetic / "images" / "test", msls / "test")
    ds = open_dataset(msls)
    assert ds.layout.queries_dir == msls / "test" / "queries"
    assert not ds.synthetic  # no README in the copy


def test_missing_folders_are_named_with_the_layout(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such folder") as info:
        open_dataset(tmp_path / "absent")
    assert LAYOUT_TREE in str(info.value)
    with pytest.raises(UsageError, match="no folder images/") as info:
        open_dataset(tmp_path)
    assert LAYOUT_TREE in str(info.value)
    (tmp_path / "images" / "train").mkdir(parents=True)
    with pytest.raises(UsageError, match="no folder images/test/"):
        open_dataset(tmp_path)
    write_images(tmp_path / "images" / "test" / "database", ["@1@2@.jpg"])
    with pytest.raises(UsageError, match="no folder images/test/queries/"):
        open_dataset(tmp_path)
    (tmp_path / "images" / "test" / "queries").mkdir()
    with pytest.raises(UsageError, match="holds no images"):
        open_dataset(tmp_path)


def test_names_without_utm_open_but_recall_is_unavailable(tmp_path: Path) -> None:
    write_images(tmp_path / "database", ["@10.0@20.0@a@.jpg", "@11.0@20.0@b@.jpg"])
    write_images(tmp_path / "queries", ["@10.0@21.0@q@.jpg", "IMG_0001.jpg"])
    ds = open_dataset(tmp_path)
    assert len(ds.database) == 2 and len(ds.queries) == 2
    assert ds.positives() is None and ds.database_positions is None and ds.query_positions is None
    assert ds.positions_unavailable is not None
    assert "1 of 2 query" in ds.positions_unavailable and "IMG_0001.jpg" in ds.positions_unavailable


# ---------------------------------------------------------------- ground truth and recall


def test_positives_radius_includes_the_boundary() -> None:
    query = np.array([[550_000.0, 4_180_000.0]])
    offsets = np.array([[15.0, 20.0], [25.0, 0.0], [0.0, -25.0], [25.0 + 1e-6, 0.0], [18.0, 18.0]])
    found = positives(query + offsets, query, radius=25.0)
    assert found[0].tolist() == [0, 1, 2]  # 25 m exactly is in (sklearn's <=), beyond is out


def test_positives_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    db = rng.uniform(0, 200, (400, 2)).round(0)  # integer metres: many exact-boundary pairs
    queries = rng.uniform(0, 200, (50, 2)).round(0)
    found = positives(db, queries, radius=25.0)
    distance = np.hypot(*(queries[:, None, :] - db[None, :, :]).transpose(2, 0, 1))
    for row, got in zip(distance, found, strict=True):
        assert got.tolist() == np.flatnonzero(row <= 25.0).tolist()


def test_recall_at_hand_made_predictions() -> None:
    preds = np.array(
        [
            [7, 1, 2, 3, 4, 5],  # hit at rank 1
            [0, 1, 2, 3, 9, 5],  # hit at rank 5
            [0, 1, 2, 3, 4, -1],  # never: FAISS padding is not a hit
            [9, 1, 2, 3, 4, 5],  # no positive within the radius: a miss, still counted
        ]
    )
    truth = [np.array([7]), np.array([9, 8]), np.array([9]), np.array([], dtype=np.int64)]
    got = recall_at(preds, truth, ns=(1, 4, 5, 6, 10))
    assert got == {"R@1": 25.0, "R@4": 25.0, "R@5": 50.0, "R@6": 50.0, "R@10": None}
    # A list that ranks the whole database answers every N.
    assert recall_at(preds, truth, ns=(10,), num_database=6) == {"R@10": 50.0}
    assert recall_at(preds, truth, ns=(10,), num_database=7) == {"R@10": None}
    with pytest.raises(ValueError):
        recall_at(preds, truth[:3])


# ---------------------------------------------------------------- the command line


def test_make_dataset_command(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "ds"
    args = ["make-dataset", str(out), "--places", "2", "--queries-per-place", "1"]
    result = runner.invoke(app, [*args, "--distractors", "1", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "SYNTHETIC" in result.output and "1 of them distractors" in result.output
    assert len(open_dataset(out).queries) == 2
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--force" in result.output
    result = runner.invoke(app, [*args, "--force"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["make-dataset", str(tmp_path / "x"), "--places", "0"])
    assert result.exit_code == 2 and "Invalid value for '--places'" in result.output
