"""Positions from a CSV or from file names: parsing, bad rows named, distances, positives."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from sample_images import make_images
from typer.testing import CliRunner, Result

from fol_infer.cli import app
from fol_infer.errors import IndexStoreError, UsageError
from fol_infer.index.database import Database
from fol_infer.index.positions_store import POSITIONS_FILE, load_positions
from fol_infer.positions import (
    PositionKind,
    Positions,
    distances_m,
    positions_of,
    positives,
    read_positions_csv,
)


def write(tmp_path: Path, text: str, name: str = "pos.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_utm_csv_paths_are_relative_to_the_csv_folder(tmp_path: Path) -> None:
    csv = write(tmp_path, "path,easting,northing\ndatabase/a.jpg,10,20\nqueries/q.jpg, 13 ,24\n")
    table = read_positions_csv(csv)
    assert table.kind is PositionKind.UTM
    db = tmp_path / "database" / "a.jpg"
    found, missing = positions_of([db, tmp_path / "database" / "b.jpg"], table)
    assert found is not None and missing == [str(tmp_path / "database" / "b.jpg")]
    np.testing.assert_array_equal(found.coords[0], [10, 20])
    assert found.known.tolist() == [True, False]
    (q,) = positions_of([tmp_path / "queries" / "q.jpg"], table)[0].coords  # type: ignore[union-attr]
    assert positives(found, Positions(PositionKind.UTM, q[None]), 5.0)[0].tolist() == [0]
    assert positives(found, Positions(PositionKind.UTM, q[None]), 4.99)[0].tolist() == []


def test_csv_wins_over_names_and_names_fill_in(tmp_path: Path) -> None:
    table = read_positions_csv(write(tmp_path, "path,easting,northing\n@1@2@.jpg,5,6\n"))
    found, missing = positions_of([tmp_path / "@1@2@.jpg", tmp_path / "@7@8@.jpg"], table)
    assert found is not None and not missing
    assert found.coords.tolist() == [[5, 6], [7, 8]]
    nothing, missing = positions_of([tmp_path / "plain.jpg"])
    assert nothing is None and missing == [str(tmp_path / "plain.jpg")]


def test_latlon_great_circle_distances(tmp_path: Path) -> None:
    csv = write(tmp_path, "path,lat,lon,extra\na.jpg,0,0,x\nb.jpg,0,1,y\nc.jpg,48.8566,2.3522,z\n")
    table = read_positions_csv(csv)
    assert table.kind is PositionKind.LATLON
    found, _ = positions_of([tmp_path / n for n in ("a.jpg", "b.jpg", "@1@2@.jpg")], table)
    assert found is not None and found.known.tolist() == [True, True, False]  # no UTM with lat/lon
    d = found.distances_m([0.0, 0.0])
    assert d[0] == 0 and d[1] == pytest.approx(2 * math.pi * 6_371_008.8 / 360, rel=1e-9)
    # London -> Paris, about 343.5 km on the mean sphere.
    london_paris = distances_m(
        PositionKind.LATLON, np.array([[51.5074, -0.1278]]), np.array([48.8566, 2.3522])
    )
    assert london_paris[0] == pytest.approx(343_500, rel=0.005)
    queries = Positions(PositionKind.LATLON, np.array([[0.0, 0.0002]]))  # ~22 m east of a.jpg
    assert positives(found, queries, 25.0)[0].tolist() == [0]
    assert positives(found, queries, 20.0)[0].tolist() == []


def test_bad_rows_are_named_with_line_and_reason(tmp_path: Path) -> None:
    csv = write(
        tmp_path,
        "path,lat,lon\n"
        "a.jpg,1,2\n"
        "b.jpg,,2\n"  # line 3: missing lat
        "a.jpg,3,4\n"  # line 4: duplicate
        "c.jpg,north,2\n"  # line 5: non-numeric
        "d.jpg,91,2\n"  # line 6: out of range
        "e.jpg,1,-181\n"  # line 7: out of range
        "\n"
        "f.jpg,1\n",  # line 9: missing lon
    )
    with pytest.raises(UsageError) as err:
        read_positions_csv(csv)
    message = str(err.value)
    assert "6 bad rows" in message
    for expected in (
        "line 3: missing lat",
        "line 4: duplicate path 'a.jpg' (first on line 2)",
        "line 5: lat 'north' is not a number",
        "line 6: lat 91.0 is outside [-90, 90]",
        "line 7: lon -181.0 is outside [-180, 180]",
        "line 9: missing lon",
    ):
        assert expected in message


def test_duplicate_after_normalisation_and_header_errors(tmp_path: Path) -> None:
    csv = write(tmp_path, "path,easting,northing\na.jpg,1,2\n./sub/../a.jpg,1,2\n")
    with pytest.raises(UsageError, match="line 3: duplicate path"):
        read_positions_csv(csv)
    with pytest.raises(UsageError, match="path,easting,northing .* or path,lat,lon"):
        read_positions_csv(write(tmp_path, "file,x,y\na.jpg,1,2\n", "h.csv"))
    with pytest.raises(UsageError, match="not found"):
        read_positions_csv(tmp_path / "absent.csv")
    with pytest.raises(UsageError, match="no positions"):
        read_positions_csv(write(tmp_path, "path,lat,lon\n", "e.csv"))
    with pytest.raises(UsageError, match="inf.* not a finite number"):
        read_positions_csv(write(tmp_path, "path,easting,northing\na.jpg,inf,2\n", "i.csv"))


def test_kinds_must_agree_and_the_radius_be_a_distance() -> None:
    p = Positions(PositionKind.LATLON, np.array([[1.0, 2.0], [np.nan, np.nan]]))
    with pytest.raises(UsageError, match="same kind"):
        positives(p, np.zeros((1, 2)))
    with pytest.raises(UsageError, match="radius"):
        positives(np.zeros((1, 2)), np.zeros((1, 2)), radius=-1)


def test_unknown_database_positions_are_never_positives() -> None:
    db = Positions(PositionKind.UTM, np.array([[0.0, 0.0], [np.nan, np.nan], [3.0, 4.0]]))
    q = Positions(PositionKind.UTM, np.array([[0.0, 0.0], [np.nan, np.nan]]))
    found = positives(db, q, 5.0)
    assert found[0].tolist() == [0, 2] and found[1].tolist() == []


# ---------------------------------------------------------------- the commands that read them


def index_cli(bundle: Path, db: Path, out: Path, csv: Path) -> Result:
    argv = ["index", str(bundle), str(db), "--out", str(out), "--positions", str(csv)]
    return CliRunner().invoke(app, argv)


def test_index_records_csv_positions_and_names_the_missing(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    db = tmp_path / "db"
    make_images(db, 3)
    names = sorted(p.name for p in db.iterdir())
    rows = f"db/{names[0]},45.0,7.0\ndb/{names[1]},45.001,7.0\nqueries/q1.jpg,45.0,7.1\n"
    csv = write(tmp_path, "path,lat,lon\n" + rows)
    result = index_cli(tiny_bundle, db, tmp_path / "ix", csv)
    assert result.exit_code == 0, result.output
    assert "positions from" in result.output and "2 of 3" in result.output
    assert "1 of 3 database images have no position: " + names[2] in result.output
    assert f"note: 1 of 3 rows of {csv} match no image: line 4 ('q1.jpg')" in result.output
    with Database(tmp_path / "ix") as database:
        absolute = [database.absolute_path(i) for i in range(len(database))]
        found, missing = load_positions(tmp_path / "ix", database.paths, absolute)
    assert found is not None and found.kind is PositionKind.LATLON and missing == [names[2]]
    assert found.distances_m([45.0, 7.0])[1] == pytest.approx(111.2, abs=0.1)
    bad = write(tmp_path, "path,lat,lon\nx.jpg,95,0\n", "bad.csv")
    result = index_cli(tiny_bundle, db, tmp_path / "ix2", bad)
    assert result.exit_code == 2 and "line 2: lat 95.0 is outside" in result.output
    assert not (tmp_path / "ix2").exists()  # refused before any work


def test_a_map_keeps_its_positions_and_a_rerun_records_lost_ones(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """positions.json is written after the build commits: a run stopped in between (the file
    deleted here) gets it from the same command with --append, which adds no image."""
    db = tmp_path / "db"
    make_images(db, 4)
    names = sorted(p.name for p in db.iterdir())
    csv = write(tmp_path, "path,easting,northing\n" + f"db/{names[1]},500010.0,4000020.0\n")
    for out, extra in (
        (tmp_path / "ix", []),
        (tmp_path / "map", ["--shards", "2", "--batch", "2"]),
    ):
        argv = ["index", str(tiny_bundle), str(db), "--out", str(out), "--positions", str(csv)]
        first = CliRunner().invoke(app, argv + extra)
        assert first.exit_code == 0, first.output
        (out / POSITIONS_FILE).unlink()
        result = CliRunner().invoke(app, [*argv, "--append"])
        assert result.exit_code == 0 and "4 of 4" in result.output, result.output
        assert " 0 added" in result.output
        (out / "elsewhere").mkdir()  # the names' own UTM must not be what is read back
        absolute = [out / "elsewhere" / f"{i}.jpg" for i in range(len(names))]
        found, missing = load_positions(out, names, absolute)
        assert found is not None and found.coords[1].tolist() == [500010.0, 4000020.0]
        assert missing == [] and np.isfinite(found.coords).all()


def test_bench_reads_a_positions_csv_and_its_radius(tiny_bundle: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    rows = ["path,easting,northing"]
    for folder, n in (("database", 3), ("queries", 2)):
        make_images(root / folder, n)
        for i, path in enumerate(sorted((root / folder).iterdir())):
            plain = path.with_name(f"img{i}.jpg")  # no UTM in the name
            path.rename(plain)
            rows.append(f"{folder}/{plain.name},{100.0 * i},0")
    csv = write(root, "\n".join([*rows, "queries/gone.jpg,5,5"]) + "\n")
    out = tmp_path / "r.json"
    argv = ["bench", "--bundle", str(tiny_bundle), "--dataset", str(root), "--warmup", "0",
            "--reranker", "cpu", "--positions", str(csv), "--positive-radius", "30",
            "--json", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["recall"]["unavailable"] is None and report["recall"]["global"]["1"] is not None
    assert report["inputs"]["positive_radius_m"] == 30.0
    note = f"1 of 6 rows of {csv} match no image: line 7 ('gone.jpg')"
    assert note in report["notes"] and note in " ".join(result.output.split())


def test_dataset_with_a_csv_names_the_images_it_lacks(tmp_path: Path) -> None:
    from fol_infer.bench.dataset import open_dataset

    for folder in ("database", "queries"):
        make_images(tmp_path / "ds" / folder, 2)
    names = {
        f: sorted(p.name for p in (tmp_path / "ds" / f).iterdir()) for f in ("database", "queries")
    }
    rows = [f"database/{n},45.0,7.0" for n in names["database"]] + [
        f"queries/{names['queries'][0]},45.0,7.0"
    ]
    table = read_positions_csv(write(tmp_path / "ds", "path,lat,lon\n" + "\n".join(rows) + "\n"))
    ds = open_dataset(tmp_path / "ds", table)
    assert ds.positives() is None and ds.positions_unavailable is not None
    assert (
        f"1 of 2 query images have no position: {names['queries'][1]}" in ds.positions_unavailable
    )
    full = write(
        tmp_path / "ds",
        "path,lat,lon\n" + "\n".join([*rows, f"queries/{names['queries'][1]},46.0,7.0"]) + "\n",
        "all.csv",
    )
    found = open_dataset(tmp_path / "ds", read_positions_csv(full)).positives(100.0)
    assert found is not None and [f.tolist() for f in found] == [[0, 1], []]


def test_show_results_refuses_a_bad_csv_before_any_work(tmp_path: Path) -> None:
    bad = write(tmp_path, "path,easting,northing\na.jpg,1,x\n")
    result = CliRunner().invoke(
        app, ["show", "results", str(tmp_path / "no-index"), str(tmp_path), "--out",
              str(tmp_path / "r.png"), "--positions", str(bad)]
    )  # fmt: skip
    assert result.exit_code == 2 and "line 2: northing 'x' is not a number" in result.output


def test_a_quoted_name_may_hold_a_newline_and_lines_stay_right(tmp_path: Path) -> None:
    """RFC 4180: a quoted field may span lines; errors name the line a row starts on."""
    text = 'path,easting,northing\n"two\nlines.jpg",1,2\n"a, b.jpg",3,4\nc.jpg,x,6\n'
    csv = write(tmp_path, text)
    with pytest.raises(UsageError, match=r"1 bad rows: line 5: easting 'x' is not a number$"):
        read_positions_csv(csv)
    table = read_positions_csv(write(tmp_path, 'path,easting,northing\n"two\nlines.jpg",1,2\n'))
    assert table.get(tmp_path / "two\nlines.jpg") == (1.0, 2.0)
    note = table.unmatched_note([tmp_path / "other.jpg"])
    source = tmp_path / "pos.csv"
    assert note == f"1 of 1 rows of {source} match no image: line 2 ('two\\nlines.jpg')"
    assert table.unmatched_note([tmp_path / "two\nlines.jpg"]) is None
    with pytest.raises(UsageError, match=r"q.csv: line 3: unexpected end of data"):
        read_positions_csv(write(tmp_path, 'path,easting,northing\na,1,2\n"open,1,2\n', "q.csv"))


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ([float("nan"), 2.0], "easting nan is not a finite number"),
        (["1", 2.0], "easting '1' is not a number"),
        ([1.0], "is not a pair of numbers"),
        (3.0, "is not a pair of numbers"),
    ],
)
def test_a_tampered_positions_record_names_the_entry(
    tmp_path: Path, entry: object, why: str
) -> None:
    record = {"format": "fol-infer-index-positions", "kind": "utm", "positions": {"a.jpg": entry}}
    (tmp_path / POSITIONS_FILE).write_text(json.dumps(record))
    with pytest.raises(IndexStoreError, match=f"positions\\['a.jpg'\\] {why}.*--append"):
        load_positions(tmp_path, ["a.jpg"], [tmp_path / "a.jpg"])
    record |= {"kind": "latlon", "positions": {"a.jpg": [95.0, 0.0]}}
    (tmp_path / POSITIONS_FILE).write_text(json.dumps(record))
    with pytest.raises(IndexStoreError, match=r"lat 95.0 is outside \[-90, 90\]"):
        load_positions(tmp_path, ["a.jpg"], [tmp_path / "a.jpg"])
