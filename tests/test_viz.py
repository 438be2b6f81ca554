"""Figures: the data each one plots (regions, token positions, match pairs, result frames),
checked against the encoder and the re-ranker; bad input; PNG and SVG files written."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, shared_data
from sample_images import make_images
from typer.testing import CliRunner

from fol_infer.backends import open_encoder
from fol_infer.bundle import Bundle
from fol_infer.cli import app
from fol_infer.errors import UsageError
from fol_infer.pipeline import GlobalHit, QueryResult, RerankHit
from fol_infer.positions import PositionKind, Positions
from fol_infer.rerank import RerankSettings, count_mutual_matches
from fol_infer.viz.bench_charts import STAGE_ORDER, chart_series, load_report
from fol_infer.viz.figure import GREEN, GREY, RED, new_figure
from fol_infer.viz.matches import match_figure
from fol_infer.viz.regions import region_figure
from fol_infer.viz.results import results_figure
from fol_infer.viz.tokens import EncodedImage, encode_image, token_cells, token_xy


def run(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two generated photos of different sizes (the real ones are used where present)."""
    folder = tmp_path_factory.mktemp("photos")
    return make_images(folder, 1, seed=5, size=(150, 260)) + make_images(
        folder / "b", 1, seed=6, size=(300, 200)
    )


def encoded(bundle_dir: Path, paths: list[Path]) -> list[EncodedImage]:
    bundle = Bundle.open(bundle_dir)
    with open_encoder(bundle) as encoder:
        return [encode_image(encoder, bundle, p) for p in paths]


@pytest.mark.parametrize("which", ["tiny_bundle", "tiny_bundle_322"])
def test_token_positions_follow_the_local_graph(
    which: str, photos: list[Path], request: pytest.FixtureRequest
) -> None:
    """As many positions as tokens, and the tokens at a position are the graph's: a token's
    row-major cell order is the order the graph lists them (checked on the upsampled grid)."""
    for image in encoded(request.getfixturevalue(which), photos):
        cells = token_cells(image.region_mask)
        assert len(cells) == len(image.tokens)
        h, w = image.region_mask.shape
        assert cells[:, 0].max() <= 4 * h - 4 and cells[:, 1].max() <= 4 * w - 4
        order = cells[:, 0] * (4 * w - 3) + cells[:, 1]
        assert np.all(np.diff(order) > 0)  # row-major, as the tokens come
        xy = token_xy(image)
        height, width = image.pixels.shape[:2]
        assert xy[:, 0].min() >= 0 and xy[:, 0].max() <= width
        assert xy[:, 1].min() >= 0 and xy[:, 1].max() <= height
        # A token is kept by the patch floor(row * h / H') (nearest upsampling of the mask) but
        # its feature is centred at patch coordinate row / 4 (the transposed convolutions):
        # it lies in or within half a patch of the region that kept it, never further.
        sx, sy = image.scale
        u = np.stack([xy[:, 1] / sy, xy[:, 0] / sx], axis=1) / 14  # (row, col) in patches
        keeper = np.stack([cells[:, 0] * h // (4 * h - 3), cells[:, 1] * w // (4 * w - 3)], 1)
        assert image.region_mask[keeper[:, 0], keeper[:, 1]].all()
        outside = np.maximum(keeper - u, u - (keeper + 1)).max(axis=1)
        assert outside.max() <= 0.5 + 1e-9


def test_region_boxes_are_the_kept_patches_by_confidence(
    tiny_bundle: Path, photos: list[Path]
) -> None:
    (image,) = encoded(tiny_bundle, photos[1:])
    data = region_figure(image)
    assert data.boxes.shape == (225, 4) and data.confidence.shape == (225,)
    assert np.all(np.diff(data.confidence) <= 0)  # most confident first
    sx, sy = image.scale
    cols = np.rint(data.boxes[:, 0] / sx / 14).astype(int)
    rows = np.rint(data.boxes[:, 1] / sy / 14).astype(int)
    assert image.region_mask[rows, cols].all() and len(set(zip(rows, cols))) == 225
    np.testing.assert_array_equal(data.confidence, image.confidence[rows, cols])
    kept_min = data.confidence.min()
    assert (image.confidence[~image.region_mask] <= kept_min).all()  # the top 225
    height, width = image.pixels.shape[:2]
    assert data.boxes[:, 2].max() <= width + 1e-6 and data.boxes[:, 3].max() <= height + 1e-6


def test_match_pairs_are_what_the_reranker_counts(tiny_bundle: Path, photos: list[Path]) -> None:
    q, c = encoded(tiny_bundle, photos)
    data = match_figure(q, c, RerankSettings(0.7, "cpu"), max_lines=10)
    assert data.count == int(count_mutual_matches(q.tokens, [c.tokens], 0.7, "cpu")[0])
    assert data.count == len(data.pairs) > 0
    s = q.tokens @ c.tokens.T  # brute force: mutual argmax above the threshold
    for (i, j), sim in zip(data.pairs, data.similarity):
        assert s[i].argmax() == j and s[:, j].argmax() == i and sim > 0.7
        assert sim == pytest.approx(s[i, j], abs=1e-5)
    assert len(data.shown) == min(10, data.count) and set(data.shown) <= set(range(data.count))
    assert len(data.query_xy) == len(q.tokens) and len(data.candidate_xy) == len(c.tokens)
    lower = match_figure(q, c, RerankSettings(0.5, "cpu"))
    assert lower.count >= data.count


def test_matches_on_real_photographs(tiny_bundle_322: Path, tmp_path: Path) -> None:
    pair = shared_data() / "fol-pair"
    out = tmp_path / "m.png"
    code, log = run(
        "show", "matches", tiny_bundle_322, pair / "query.jpg", pair / "database.jpg", "--out", out,
        "--reranker", "cpu",
    )  # fmt: skip
    assert code == 0, log
    q, c = encoded(tiny_bundle_322, [pair / "query.jpg", pair / "database.jpg"])
    expected = int(count_mutual_matches(q.tokens, [c.tokens], 0.7, "cpu")[0])
    assert f"{expected} matches" in log and out.read_bytes()[:4] == b"\x89PNG"


def test_tokens_of_different_resolutions_are_refused(
    tiny_bundle: Path, tiny_bundle_322: Path, photos: list[Path], tmp_path: Path
) -> None:
    (q,) = encoded(tiny_bundle, photos[:1])
    (c,) = encoded(tiny_bundle_322, photos[1:])
    with pytest.raises(UsageError, match="210x224 .* 322x322"):
        match_figure(q, c, RerankSettings())
    code, log = run(
        "show", "matches", tiny_bundle, photos[0], photos[1], "--out", tmp_path / "m.png",
        "--candidate-bundle", tiny_bundle_322,
    )  # fmt: skip
    assert code == 2 and "cannot be matched" in log and "Traceback" not in log
    assert not (tmp_path / "m.png").exists()


def result(query: str, ids: list[int], matches: list[int] | None) -> QueryResult:
    hits = [GlobalHit(r + 1, i, f"db{i}.jpg", 1.0 - r / 10) for r, i in enumerate(ids)]
    reranked = None
    if matches is not None:
        order = sorted(range(len(ids)), key=lambda k: -matches[k])
        reranked = [
            RerankHit(r + 1, ids[k], f"db{ids[k]}.jpg", matches[k]) for r, k in enumerate(order)
        ]
    return QueryResult(query, hits, reranked, database_root="/data/db")


def test_result_frames_follow_the_positive_radius() -> None:
    db = Positions(PositionKind.UTM, np.array([[0, 0], [30, 0], [10, 10], [np.nan, np.nan]], float))
    queries = Positions(PositionKind.UTM, np.array([[0.0, 0.0], [np.nan, np.nan]]))
    found = [result("/q/a.jpg", [1, 0, 3, 2], [5, 1, 9, 2]), result("/q/b.jpg", [0, 1], [1, 2])]
    data = results_figure(found, db, queries, 25.0, database_missing=["db3.jpg"])
    first, second = data.rows
    assert [t.frame for t in first.global_tiles] == [RED, GREEN, GREY, GREEN]
    assert first.reranked_tiles is not None
    assert [t.file for t in first.reranked_tiles] == [
        "/data/db/db3.jpg", "/data/db/db1.jpg", "/data/db/db2.jpg", "/data/db/db0.jpg"
    ]  # fmt: skip
    assert [t.correct for t in first.reranked_tiles] == [None, False, True, True]
    assert "9 matches" in first.reranked_tiles[0].label
    assert all(t.correct is None for t in second.global_tiles)  # the query has no position
    assert any("1 of 4 database images have no position: db3.jpg" in n for n in data.notes)
    assert any("1 of 2 query images have no position: b.jpg" in n for n in data.notes)
    assert results_figure(found, db, queries, 40.0).rows[0].global_tiles[0].correct is True
    plain = results_figure(found, None, None, 25.0)
    assert all(t.frame == GREY for r in plain.rows for t in r.global_tiles)
    assert any("no positions" in n and "plain frames" in n for n in plain.notes)


def test_show_results_and_regions_write_png_and_svg(tiny_bundle: Path, tmp_path: Path) -> None:
    db = tmp_path / "db"
    make_images(db, 4)
    (query,) = make_images(tmp_path / "q", 1, seed=9)
    code, log = run("index", tiny_bundle, db, "--out", tmp_path / "idx")
    assert code == 0, log
    out = tmp_path / "results.svg"
    code, log = run("show", "results", tmp_path / "idx", query, "--out", out, "--top-k", "3")
    assert code == 0, log
    assert "<svg" in out.read_text()[:500] and "plain frames" not in log  # UTM names: frames
    positions = tmp_path / "pos.csv"
    positions.write_text(f"path,easting,northing\nq/{query.name},500000,4000000\nx.jpg,1,2\n")
    code, log = run("show", "results", tmp_path / "idx", query, "--out", out,
                    "--positions", positions)  # fmt: skip
    assert code == 0 and "match no image: line 3 ('x.jpg')" in " ".join(log.split()), log
    plain = tmp_path / "plain.jpg"
    query.rename(plain)
    code, log = run("show", "results", tmp_path / "idx", plain, "--out", tmp_path / "r.png")
    assert code == 0 and "queries have no positions" in log
    code, log = run("show", "regions", tiny_bundle, plain, "--out", tmp_path / "r.png")
    assert code == 0 and "225 regions" in log
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    code, log = run("show", "regions", tiny_bundle, plain, "--out", tmp_path / "r.jpg")
    assert code == 2 and ".png or an .svg" in log


def test_without_matplotlib_the_error_names_the_extra(
    tiny_bundle: Path, photos: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(UsageError, match=r"pip install 'fol-infer\[viz\]'"):
        new_figure()
    code, log = run("show", "regions", tiny_bundle, photos[0], "--out", tmp_path / "r.png")
    assert code == 2 and "fol-infer[viz]" in log and "Traceback" not in log


REPORTS = REPO / "benchmarks" / "results"


def test_bench_chart_data_comes_from_the_reports(tmp_path: Path) -> None:
    names = (
        "bench_default_onnx_epyc2_run1",
        "bench_default_onnx_epyc2_run2",
        "bench_default_torch_epyc2",
    )
    paths = [REPORTS / f"{name}.json" for name in names]
    reports = [load_report(p) for p in paths]
    series = chart_series(reports, [p.stem for p in paths])
    assert [s.label for s in series] == [
        "onnx, fp16 tokens [bench_default_onnx_epyc2_run1]",
        "onnx, fp16 tokens [bench_default_onnx_epyc2_run2]",
        "torch, fp16 tokens",
    ]
    for s, report in zip(series, reports):
        assert list(s.stages_ms) == [st for st in STAGE_ORDER if st in report["latency_ms"]]
        assert s.stages_ms["rerank"] == report["latency_ms"]["rerank"]["p50"]
        assert s.depths == report["recall_vs_rerank_k"]["K"]
        assert s.recall["1"] == report["recall_vs_rerank_k"]["1"] and not s.trained
    out = tmp_path / "bench.svg"
    code, log = run("show", "bench", *paths, "--out", out)
    assert code == 0 and "3 reports" in log and "<svg" in out.read_text()[:500]
    (tmp_path / "other.json").write_text('{"schema": "something else"}')
    code, log = run("show", "bench", tmp_path / "other.json", "--out", out)
    assert code == 2 and "not a fol-infer bench report" in log


def test_matplotlib_is_imported_in_viz_only() -> None:
    package = REPO / "fol_infer"
    importers = [
        p.relative_to(package).as_posix()
        for p in package.rglob("*.py")
        if re.search(r"^\s*(from|import) matplotlib", p.read_text(), re.M)
    ]
    assert importers and all(name.startswith("viz/") for name in importers), importers


def test_show_bench_names_the_field_of_a_truncated_or_edited_report(tmp_path: Path) -> None:
    good = json.loads((REPORTS / "bench_default_onnx_epyc2_run1.json").read_text())
    edits = [
        (lambda r: r["latency_ms"]["global"].pop("p50"), "latency_ms.global.p50 is missing"),
        (lambda r: r["latency_ms"]["global"].update(p50="abc"), "global.p50 is not a number"),
        (lambda r: r["latency_ms"]["rerank"].update(p50=float("nan")), "rerank.p50 is nan"),
        (lambda r: r["latency_ms"].update(search=3), "latency_ms.search.p50 is missing"),
        (lambda r: r["recall_vs_rerank_k"]["1"].pop(), "recall_vs_rerank_k.1 is not a list of"),
        (lambda r: r["recall_vs_rerank_k"]["5"].__setitem__(0, 101), "5[0] is 101, not a num"),
        (lambda r: r["recall_vs_rerank_k"].update(K=[0]), "K[0] is 0, not a depth"),
        (lambda r: r["inputs"].update(trained="no"), "inputs.trained is not true or false"),
        (lambda r: r.update(environment=[]), "environment is not an object"),
    ]
    out = tmp_path / "b.png"
    for edit, field in edits:
        report = json.loads(json.dumps(good))
        edit(report)
        path = tmp_path / "r.json"
        path.write_text(json.dumps(report))
        code, log = run("show", "bench", path, "--out", out)
        assert code == 2 and f"{path}: " in log and field in log, log
        assert log.count("\n") == 1 and "Traceback" not in log
    assert not out.exists()
