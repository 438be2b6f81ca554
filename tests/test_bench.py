"""`fol-infer bench` on a tiny bundle and a tiny synthetic dataset: the report and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sample_images import make_images
from typer.testing import CliRunner

from fol_infer.bench.harness import Bench
from fol_infer.bench.synthetic import make_dataset
from fol_infer.cli import app

runner = CliRunner()


def bench(bundle: Path, dataset: Path, *args: str | Path) -> tuple[int, str]:
    """Run `fol-infer bench` on a bundle and a dataset; returns exit code and output."""
    argv = ["bench", "--bundle", str(bundle), "--dataset", str(dataset), *map(str, args)]
    result = runner.invoke(app, argv)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(
        tmp_path_factory.mktemp("ds") / "synthetic",
        places=3,
        queries_per_place=1,
        distractors=1,
        size=(240, 320),
    )


@pytest.mark.slow
def test_report_holds_every_figure(tiny_bundle: Path, dataset: Path, tmp_path: Path) -> None:
    out, md, plot = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"
    code, log = bench(
        tiny_bundle, dataset, "--json-out", out, "--markdown-out", md, "--plot-out", plot,
        "--warmup", "1",
        "--reranker", "cpu",
    )  # fmt: skip
    assert code == 0, log
    report = json.loads(out.read_text())
    assert report["schema"] == "fol-infer-bench" and report["schema_version"] == 1
    assert not report["partial"]
    assert any("UNTRAINED" in n for n in report["notes"])
    assert any("synthetic" in n for n in report["notes"])
    for stage in ("preprocess", "global", "search", "local", "fetch", "rerank", "total"):
        s = report["latency_ms"][stage]
        assert 0 <= s["p50"] <= s["p90"] <= s["p99"]
    assert set(report["recall"]["global"]) == {"1", "5", "10", "25", "100"}
    assert report["recall"]["reranked"]["100"] == 100.0  # the whole database is ranked
    assert report["inputs"]["rerank_k"] == report["inputs"]["database_images"]
    parity = report["parity"]
    assert parity["min_global_cosine"] > 0.9999 and parity["top1_agreement_global"] == 1.0
    assert all(v == 0 for v in parity["recall_delta_global"].values() if v is not None)
    memory = report["memory"]
    assert memory["token_store_bytes_per_image"] < 0.5 * memory["published_bytes_per_image"]
    assert report["throughput"]["database_images_per_s"] > 0
    assert 0 <= report["overhead"]["unattributed_share"] < 1
    assert report["environment"]["cpu"] and "numpy" in report["environment"]["libraries"]
    assert "| total |" in md.read_text() and plot.read_bytes()[:4] == b"\x89PNG"


def test_missing_layout_and_names_without_utm(tiny_bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "ds" / "images" / "test" / "database").mkdir(parents=True)
    code, log = bench(tiny_bundle, tmp_path / "ds")
    assert code == 2 and "queries" in log and "database/" in log
    for folder in ("database", "queries"):
        make_images(tmp_path / "plain" / "images" / "test" / folder, 2)
        for path in (tmp_path / "plain" / "images" / "test" / folder).iterdir():
            path.rename(path.with_name(path.name.split("@")[-1]))  # drop the UTM part
    out = tmp_path / "r.json"
    code, log = bench(tiny_bundle, tmp_path / "plain", "--json", out, "--warmup", "0")
    assert code == 0, log  # the old spelling of --json-out, accepted for one release
    assert "--json PATH is now --json-out PATH" in " ".join(log.split())
    report = json.loads(out.read_text())
    assert report["recall"]["global"] is None and "no UTM" in report["recall"]["unavailable"]
    assert "Recall unavailable" in log


def test_engine_not_installed_says_what_to_install(tiny_bundle: Path, dataset: Path) -> None:
    code, log = bench(tiny_bundle, dataset, "--engine", "trt")
    assert code == 2 and "install" in log.lower()


def test_interrupt_prints_what_was_measured(
    tiny_bundle: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def stop(self: Bench, *args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Bench, "_recall", stop)
    code, log = bench(tiny_bundle, dataset, "--warmup", "0", "--reranker", "cpu")
    assert code == 130
    assert "interrupted" in log and "PARTIAL" in log and "| total |" in log


@pytest.mark.slow
def test_bench_takes_a_token_format(tiny_bundle: Path, dataset: Path, tmp_path: Path) -> None:
    reports = {}
    for tokens in ("fp16", "int8-exact"):
        out = tmp_path / f"{tokens}.json"
        argv = ("--json-out", out, "--tokens", tokens, "--warmup", "0")
        code, log = bench(tiny_bundle, dataset, *argv)
        assert code == 0, log
        reports[tokens] = json.loads(out.read_text())
    exact = reports["int8-exact"]
    assert exact["inputs"]["tokens"] == "int8-exact"
    # int8 (1 byte + a scale per token) and float32 (4 bytes) against fp16's 2 bytes: ~2.5x
    assert (
        exact["memory"]["token_store_bytes_per_image"]
        > 2 * (reports["fp16"]["memory"]["token_store_bytes_per_image"])
    )
    assert "token store (int8-exact)" in log
    code, log = bench(tiny_bundle, dataset, "--tokens", "int8-exact", "--reranker", "torch")
    assert code == 2 and "re-ranked on the CPU" in log
    code, log = bench(tiny_bundle, dataset, "--tokens", "int4")
    assert code == 2 and "fp16, int8, int8-exact" in log


def test_bench_threshold_is_used_and_recorded(
    tiny_bundle: Path, dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "r.json"
    code, log = bench(
        tiny_bundle, dataset, "--json-out", out, "--warmup", "0", "--threshold", "0.9999",
        "--engine", "onnx",  # the product brief's spelling of --backend
    )  # fmt: skip
    assert code == 0, log
    report = json.loads(out.read_text())
    assert report["inputs"]["threshold"] == 0.9999 and report["inputs"]["engine"] == "onnx"
    assert "threshold 0.9999" in log
    # No token pair of different images is above 0.9999, so re-ranking keeps the global order:
    # equal recall.
    assert report["recall"]["reranked"] == report["recall"]["global"]
