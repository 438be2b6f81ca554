"""The query API and `fol-infer query`: same answers for every input kind and thread."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sample_images import make_images
from typer.testing import CliRunner

from fol_infer.backends import open_encoder
from fol_infer.bundle import Bundle
from fol_infer.choices import RerankBackend
from fol_infer.cli import app
from fol_infer.errors import UsageError
from fol_infer.images import preprocess
from fol_infer.index.build import BuildSettings, build_index
from fol_infer.pipeline import Retriever
from fol_infer.rerank import DEFAULT_THRESHOLD, RerankSettings, count_mutual_matches


@pytest.fixture(scope="module")
def index_dir(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    make_images(root / "db", 6)
    bundle = Bundle.open(tiny_bundle)
    with open_encoder(bundle) as encoder:
        build_index(bundle, encoder, root / "db", root / "idx", BuildSettings(batch=4))
    return root / "idx"


@pytest.fixture(scope="module")
def queries(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_images(tmp_path_factory.mktemp("q"), 3, seed=1)


def test_results_follow_the_spec_and_the_json_shape(
    tiny_bundle: Path, index_dir: Path, queries: list[Path]
) -> None:
    with Retriever(tiny_bundle, index_dir) as retriever:
        (result,) = retriever.query([queries[0]], top_k=4, rerank_k=5)
        (global_only,) = retriever.query([queries[0]], top_k=5, rerank=False)
        image = preprocess(queries[0], retriever.bundle.resolution)[None]
        query_tokens = retriever.encoder.encode(image).token_list()[0]
        candidates = [h.db_index for h in global_only.global_hits]
        candidate_tokens = retriever.shards.databases[0].tokens.get(candidates)
    assert [h.rank for h in result.global_hits] == [1, 2, 3, 4]
    assert [h.db_index for h in result.global_hits] == candidates[:4]
    scores = [h.score for h in result.global_hits]
    assert scores == sorted(scores, reverse=True)
    expected = count_mutual_matches(query_tokens, candidate_tokens, backend="cpu")
    best = sorted(range(5), key=lambda j: (-expected[j], j))[:4]  # ties keep the global rank
    assert result.reranked is not None
    assert [h.db_index for h in result.reranked] == [candidates[j] for j in best]
    assert [h.matches for h in result.reranked] == [int(expected[j]) for j in best]
    doc = result.to_json()
    assert set(doc) == {"query", "database_root", "global", "reranked", "threshold"}
    assert doc["threshold"] == DEFAULT_THRESHOLD and global_only.to_json()["threshold"] is None
    assert set(doc["global"][0]) == {"rank", "db_index", "path", "file", "score"}
    assert set(doc["reranked"][0]) == {"rank", "db_index", "path", "file", "matches"}


def test_paths_pil_and_arrays_give_the_same_answer(
    tiny_bundle: Path, index_dir: Path, queries: list[Path]
) -> None:
    with Retriever(tiny_bundle, index_dir) as retriever:
        pil = Image.open(queries[1])
        answers = [
            retriever.query(src, top_k=3, rerank_k=4)[0]
            for src in (queries[1], pil, np.asarray(pil))
        ]
    for other in answers[1:]:
        assert [h.db_index for h in other.reranked or []] == [
            h.db_index for h in answers[0].reranked or []
        ]
        np.testing.assert_allclose(
            [h.score for h in other.global_hits],
            [h.score for h in answers[0].global_hits],
            atol=1e-6,
        )


def test_concurrent_queries_match_serial_ones(
    tiny_bundle: Path, index_dir: Path, queries: list[Path]
) -> None:
    with Retriever(tiny_bundle, index_dir) as retriever:
        serial = [retriever.query([q], top_k=3, rerank_k=4)[0].to_json() for q in queries]
        with ThreadPoolExecutor(4) as pool:
            parallel = list(
                pool.map(
                    lambda q: retriever.query([q], top_k=3, rerank_k=4)[0].to_json(), queries * 2
                )
            )
    assert parallel == serial * 2


def test_k_larger_than_database_is_clamped_with_a_notice(
    tiny_bundle: Path, index_dir: Path, queries: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING), Retriever(tiny_bundle, index_dir) as retriever:
        (result,) = retriever.query([queries[0]], top_k=50, rerank_k=100)
    assert (
        len(result.global_hits) == 6 and result.reranked is not None and len(result.reranked) == 6
    )
    assert "larger than the database (6 images)" in caplog.text


def test_no_rerank_never_runs_the_local_branch(
    tiny_bundle: Path, index_dir: Path, queries: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    with Retriever(tiny_bundle, index_dir) as retriever:
        monkeypatch.setattr(
            retriever.encoder, "encode_local", lambda *_: pytest.fail("local branch ran")
        )
        (result,) = retriever.query([queries[0]], top_k=2, rerank=False)
    assert result.reranked is None and result.timings_ms["local"] == 0.0


def test_query_cli_json_and_unreadable_query(
    tiny_bundle: Path, index_dir: Path, queries: list[Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_text("nope")
    result = CliRunner().invoke(
        app,
        [
            "query",
            str(index_dir),
            str(queries[0]),
            str(broken),
            "--json",
            "--top-k",
            "2",
            "--rerank-k",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # notes and skipped images go to stderr
    assert len(doc) == 1 and doc[0]["query"] == str(queries[0])
    assert len(doc[0]["global"]) == 2 and len(doc[0]["reranked"]) == 2
    assert "broken.jpg" in result.output


def test_int8_exact_index_reranks_like_float32_tokens(
    tiny_bundle: Path, queries: list[Path], tmp_path: Path
) -> None:
    """The certified re-ranker on an int8-exact index: the counts of the float32 tokens."""
    make_images(tmp_path / "db", 6)
    bundle = Bundle.open(tiny_bundle)
    settings = BuildSettings(batch=3, tokens="int8-exact")
    with open_encoder(bundle) as encoder:
        build_index(bundle, encoder, tmp_path / "db", tmp_path / "idx", settings)
    with Retriever(bundle, tmp_path / "idx") as retriever:
        results = retriever.query(queries, top_k=6, rerank_k=6)
        images = np.stack([preprocess(q, bundle.resolution) for q in queries])
        query_tokens = retriever.encoder.encode(images).token_list()
        assert retriever.shards.databases[0].exact_tokens is not None
        originals = retriever.shards.databases[0].exact_tokens
        for result, tokens in zip(results, query_tokens, strict=True):
            candidates = [h.db_index for h in result.global_hits]
            expected = count_mutual_matches(tokens, originals.get(candidates), backend="cpu")
            best = sorted(range(6), key=lambda j: (-expected[j], j))
            assert result.reranked is not None
            assert [h.db_index for h in result.reranked] == [candidates[j] for j in best]
            assert [h.matches for h in result.reranked] == [int(expected[j]) for j in best]
        with ThreadPoolExecutor(3) as pool:  # the same answers from concurrent callers
            threaded = list(pool.map(lambda q: retriever.query([q], 6, 6)[0], queries))
        assert [r.reranked for r in threaded] == [r.reranked for r in results]
    with pytest.raises(UsageError, match="certified CPU re-ranker"):
        Retriever(bundle, tmp_path / "idx", rerank=RerankSettings(backend=RerankBackend.TORCH))


def test_index_cli_takes_int8_exact_and_names_the_formats(
    tiny_bundle: Path, queries: list[Path], tmp_path: Path
) -> None:
    make_images(tmp_path / "db", 3)
    base = ["index", str(tiny_bundle), str(tmp_path / "db"), "--out"]
    bad = CliRunner().invoke(app, [*base, str(tmp_path / "bad"), "--tokens", "int4"])
    assert bad.exit_code == 2 and "fp16, int8, int8-exact" in bad.output
    assert not (tmp_path / "bad").exists()
    built = CliRunner().invoke(app, [*base, str(tmp_path / "idx"), "--tokens", "int8-exact"])
    assert built.exit_code == 0, built.output
    assert sorted(p.name for p in (tmp_path / "idx").iterdir() if p.is_dir()) == [
        "descriptors",
        "tokens",
        "tokens_fp32",
    ]
    answer = CliRunner().invoke(app, ["query", str(tmp_path / "idx"), str(queries[0]), "--json"])
    assert answer.exit_code == 0, answer.output
    doc = json.loads(answer.stdout)  # notes and warnings go to stderr
    assert len(doc[0]["reranked"]) == 3


def test_a_given_encoder_is_used_and_left_open(
    tiny_bundle: Path, index_dir: Path, queries: list[Path]
) -> None:
    bundle = Bundle.open(tiny_bundle)
    with open_encoder(bundle) as encoder:
        with Retriever(bundle, index_dir, encoder=encoder) as retriever:
            assert retriever.encoder is encoder
            (first,) = retriever.query([queries[0]], top_k=3, rerank_k=3)
        image = preprocess(queries[0], bundle.resolution)[None]
        descriptor = encoder.encode(image).descriptors[0]  # still open after the retriever
    np.testing.assert_allclose(descriptor, first.descriptor, rtol=1e-5, atol=1e-6)


def test_threshold_reaches_the_reranker_from_retriever_and_query_cli(
    tiny_bundle: Path, index_dir: Path, queries: list[Path]
) -> None:
    totals = []
    for threshold in (-1.0, 0.99):  # every mutual pair counts / only near-identical tokens
        settings = RerankSettings(threshold=threshold, backend=RerankBackend.CPU)
        with Retriever(tiny_bundle, index_dir, rerank=settings) as retriever:
            (result,) = retriever.query([queries[0]], top_k=4, rerank_k=4)
            image = preprocess(queries[0], retriever.bundle.resolution)[None]
            tokens = retriever.encoder.encode(image).token_list()[0]
            candidates = [h.db_index for h in result.global_hits]
            stored = retriever.shards.databases[0].tokens.get(candidates)  # type: ignore[attr-defined]
        expected = count_mutual_matches(tokens, stored, threshold=threshold, backend="cpu")
        assert result.reranked is not None and result.threshold == threshold
        assert sorted(h.matches for h in result.reranked) == sorted(expected.tolist())
        totals.append(sum(h.matches for h in result.reranked))
    assert totals[0] > 0 and totals[1] <= totals[0]
    answer = CliRunner().invoke(
        app, ["query", str(index_dir), str(queries[0]), "--json", "--threshold", "0.99"]
    )
    assert answer.exit_code == 0, answer.output
    doc = json.loads(answer.stdout)  # notes and warnings go to stderr
    assert doc[0]["threshold"] == 0.99
    assert sum(h["matches"] for h in doc[0]["reranked"]) == totals[1]
