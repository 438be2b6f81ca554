"""rerank.onnx under ONNX Runtime: exactly the CPU re-ranker's and the reference's counts.

Small-capacity graphs (built in memory, as the bundle's is) keep these fast; the bundle's own
graph (capacity 3600) is checked through `verify`, the re-ranker dispatcher and the pipeline.
Tokens are small integers (exact products, real ties) unless a test says otherwise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from rerank_reference import reference_scores

from fol_infer.bundle import Bundle
from fol_infer.errors import BackendUnavailableError, BundleError, FolInferError, UsageError
from fol_infer.files.integrity import sha256_file
from fol_infer.rerank import RerankSettings, count_mutual_matches, count_mutual_matches_many
from fol_infer.rerank.cpu import count_mutual_matches_many_cpu

onnx = pytest.importorskip("onnx", reason="the re-rank graph is built with onnx")
from typer.testing import CliRunner  # noqa: E402

from fol_infer.cli import app  # noqa: E402
from fol_infer.rerank.graph import build_rerank_model  # noqa: E402
from fol_infer.rerank.onnx_runner import CPU, CUDA, OnnxReranker  # noqa: E402

CAPACITY, DIM = 16, 4


def runner(
    capacity: int = CAPACITY, dim: int = DIM, chunk: int = 3, candidates: str = "float32"
) -> OnnxReranker:
    model = build_rerank_model(capacity, dim, candidates).SerializeToString()
    return OnnxReranker(model, providers=[CPU], chunk=chunk)


def small_ints(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    return rng.integers(-2, 3, (n, dim)).astype(np.float32)


def expected(query: np.ndarray, cands: list[np.ndarray], threshold: float) -> np.ndarray:
    """The tests' reference, after checking the CPU re-ranker agrees with it."""
    ref = reference_scores(query, cands, threshold)
    cpu = count_mutual_matches_many_cpu([query], [cands], threshold)[0]
    np.testing.assert_array_equal(cpu, ref)
    return ref


@pytest.mark.parametrize("threshold", [0.7, 0.0, -1.0, 2.0])
def test_random_small_integer_tokens_match_the_reference(threshold: float) -> None:
    rng = np.random.default_rng(7)
    r = runner()
    for _ in range(40):
        q = small_ints(rng, int(rng.integers(0, CAPACITY + 1)))
        cands = [small_ints(rng, int(rng.integers(0, CAPACITY + 1))) for _ in range(7)]
        got = r.count_many([q], [cands], threshold)[0]
        np.testing.assert_array_equal(got, expected(q, cands, threshold))


def test_ties_and_duplicate_tokens_go_to_the_lowest_index() -> None:
    e = np.eye(DIM, dtype=np.float32)
    q = np.stack([e[0], e[0], e[1], e[2]])  # query tokens 0 and 1 are the same
    cands = [
        np.stack([e[0], e[0], e[1]]),  # duplicates on both sides: only (0, 0) and (2, 2) pair
        np.stack([e[3], e[1], e[1], e[0]]),  # j(2) = 1 (lowest of 1, 2); i(3) = 0
        np.stack([e[0] + e[1], e[0], e[1]]),  # rows 0-2 tie at column 0; only row 0 pairs
    ]
    got = runner().count_many([q], [cands], 0.5)[0]
    np.testing.assert_array_equal(got, expected(q, cands, 0.5))
    assert got.tolist() == [2, 2, 1]


def test_zero_vectors_one_token_no_match_and_exactly_one_match() -> None:
    e = np.eye(DIM, dtype=np.float32)
    zeros = np.zeros((5, DIM), np.float32)
    q = np.stack([e[0], e[1]])
    cases = {
        "zero vectors": (zeros, [zeros, zeros[:1]], -0.5),  # all ties: only (0, 0) pairs
        "one token": (e[:1], [e[:1], e[1:2]], 0.7),
        "no match": (q, [np.stack([e[2], e[3]]), np.stack([-e[0], -e[1]])], 0.7),
        "one match": (q, [np.stack([e[0], e[2]]), e[1:2]], 0.7),  # the published code says 0
    }
    r = runner()
    for name, (query, cands, thr) in cases.items():
        got = r.count_many([query], [cands], thr)[0]
        np.testing.assert_array_equal(got, expected(query, cands, thr), err_msg=name)
    assert r.count_many([zeros], [[zeros]], -0.5)[0].tolist() == [1]
    assert r.count_many([q], [cases["no match"][1]], 0.7)[0].tolist() == [0, 0]
    assert r.count_many([q], [cases["one match"][1]], 0.7)[0].tolist() == [1, 1]


def test_every_count_from_one_to_the_capacity() -> None:
    eye = np.eye(CAPACITY, dtype=np.float32)
    r = runner(dim=CAPACITY, chunk=5)
    cands = [eye[:n] for n in range(1, CAPACITY + 1)]
    got = r.count_many([eye], [cands], 0.7)[0]
    assert got.tolist() == list(range(1, CAPACITY + 1))
    padded = np.zeros((CAPACITY, CAPACITY, CAPACITY), np.float32)
    for n in range(1, CAPACITY + 1):
        padded[n - 1, :n] = eye[:n]
    counts = np.arange(1, CAPACITY + 1)
    np.testing.assert_array_equal(r.score_padded(eye, CAPACITY, padded, counts, 0.7), got)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 7])
@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_chunk_boundaries_do_not_change_counts(k: int, chunk: int) -> None:
    rng = np.random.default_rng(k)
    q = small_ints(rng, 12)
    cands = [small_ints(rng, int(rng.integers(0, CAPACITY + 1))) for _ in range(k)]
    got = runner(chunk=chunk).count_many([q], [cands], 0.0)[0]
    assert got.dtype == np.int64 and got.shape == (k,)
    np.testing.assert_array_equal(got, expected(q, cands, 0.0))


def test_fp16_inputs_are_cast_up_before_the_product() -> None:
    rng = np.random.default_rng(3)
    q = rng.standard_normal((14, DIM)).astype(np.float16)
    cands = [rng.standard_normal((n, DIM)).astype(np.float16) for n in (16, 9, 1, 0)]
    q /= np.linalg.norm(q.astype(np.float32), axis=1, keepdims=True).astype(np.float16)
    want = count_mutual_matches_many_cpu([q], [cands], 0.3)[0]
    assert want.sum() > 0
    np.testing.assert_array_equal(runner().count_many([q], [cands], 0.3)[0], want)
    engine_variant = runner(candidates="float16")  # the TensorRT engine's graph, in ORT
    assert engine_variant.shape.dtype == np.float16
    np.testing.assert_array_equal(engine_variant.count_many([q], [cands], 0.3)[0], want)


def test_threshold_rounding_matches_the_cpu_re_ranker() -> None:
    """A similarity equal to float32(t) > t passes `s > t`, though it fails `s > float32(t)`."""
    t = 0.3  # float32(0.3) rounds up
    assert float(np.float32(t)) > t
    q = np.zeros((1, DIM), np.float32)
    q[0, 0] = 1.0
    c = np.zeros((1, DIM), np.float32)
    c[0, 0] = np.float32(t)
    assert runner().count_many([q], [[c]], t)[0].tolist() == [1]
    assert count_mutual_matches_many_cpu([q], [[c]], t)[0].tolist() == [1]


def test_dispatcher_runs_the_graph_like_the_cpu_backend() -> None:
    """backend="onnx" without a bundle builds the graph in memory for the inputs' sizes."""
    rng = np.random.default_rng(11)
    qs = [small_ints(rng, n, 8) for n in (30, 0, 5)]
    cls = [[small_ints(rng, n, 8).astype(np.float16) for n in (0, 3, 70, 12)] for _ in qs]
    for thr in (0.7, -0.99, 0.99):  # small-integer similarities: every or almost no pair
        onnx_scores = count_mutual_matches_many(qs, cls, thr, backend="onnx")
        cpu_scores = count_mutual_matches_many(qs, cls, thr, backend="cpu")
        for a, b in zip(onnx_scores, cpu_scores, strict=True):
            np.testing.assert_array_equal(a, b)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(UsageError, match="finite"):
            count_mutual_matches(qs[0], cls[0], bad, backend="onnx")
    assert count_mutual_matches(qs[0], [], backend="onnx").shape == (0,)


def test_bad_input_is_named() -> None:
    r = runner()
    q = np.ones((3, DIM), np.float32)
    with pytest.raises(ValueError, match=r"candidate 1 of query 0 has tokens of shape \(2, 5\)"):
        r.count_many([q], [[q, np.ones((2, DIM + 1), np.float32)]], 0.7)
    with pytest.raises(ValueError, match="17 tokens, above the re-rank graph's capacity of 16"):
        r.count_many([q], [[np.ones((CAPACITY + 1, DIM), np.float32)]], 0.7)
    with pytest.raises(ValueError, match="query 0 has 17 tokens"):
        r.count_many([np.ones((CAPACITY + 1, DIM), np.float32)], [[q]], 0.7)
    padded = np.zeros((2, CAPACITY, DIM), np.float32)
    query = np.zeros((CAPACITY, DIM), np.float32)
    for counts, what in (([3, -1], r"count \[1\] = -1 is outside 0..16"), ([17, 0], "= 17")):
        with pytest.raises(ValueError, match=what):
            r.score_padded(query, 3, padded, np.array(counts), 0.7)
    with pytest.raises(ValueError, match=r"query count \[0\] = 20"):
        r.score_padded(query, 20, padded, np.array([1, 1]), 0.7)
    with pytest.raises(ValueError, match=r"takes \(n, 16, 4\)"):
        r.score_padded(query, 3, np.zeros((2, CAPACITY, 8), np.float32), np.array([1, 1]), 0.7)
    with pytest.raises(ValueError, match="counts must be 2 integers"):
        r.score_padded(query, 3, padded, np.array([1.0, 1.0]), 0.7)
    with pytest.raises(ValueError, match="chunk must be a positive"):
        runner(chunk=0)
    with pytest.raises(UsageError, match="pass the bundle"):
        count_mutual_matches(q, [q], backend="trt")


# --- the bundle's graph ------------------------------------------------------------------------


def without_rerank_graph(bundle_dir: Path, tmp_path: Path) -> Path:
    """A copy of a bundle as exported before rerank.onnx existed."""
    copy = tmp_path / "old-bundle"
    shutil.copytree(bundle_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["rerank"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / "rerank.onnx").unlink()
    return copy


@pytest.mark.slow
def test_verify_checks_the_rerank_graph(tiny_bundle: Path, tmp_path: Path) -> None:
    from fol_infer.rerank.graph_check import check_rerank

    result = CliRunner().invoke(app, ["verify", str(tiny_bundle)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"rerank.onnx ({CPU}): equal counts" in result.output  # 2 formats x 2 queries x 4 sets
    assert "16/16" in result.output

    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_bundle, tampered)
    with np.load(tampered / "reference.npz") as data:
        arrays = dict(data)
    arrays["rerank_counts"][0, 0] += 1
    np.savez(tampered / "reference.npz", **arrays)
    manifest = json.loads((tampered / "manifest.json").read_text())
    manifest["reference"]["bytes"] = (tampered / "reference.npz").stat().st_size
    manifest["reference"]["sha256"] = sha256_file(tampered / "reference.npz")
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    check = check_rerank(Bundle.open(tampered))
    assert not check.passed and check.equal == check.pairs - 1
    assert check.first_difference.startswith("fp32 candidates: query 0, candidate set 0")


def test_a_bundle_without_the_graph_is_told_to_re_export(tiny_bundle: Path, tmp_path: Path) -> None:
    old = without_rerank_graph(tiny_bundle, tmp_path)
    bundle = Bundle.open(old, verify="full")  # still a valid bundle for the encoders
    q = np.ones((3, 128), np.float32)
    for backend in ("onnx", "trt"):
        with pytest.raises(
            BundleError, match="exported before the re-rank graph existed; re-export"
        ):
            count_mutual_matches(q, [q], backend=backend, bundle=bundle)
    result = CliRunner().invoke(app, ["verify", str(old)])
    assert result.exit_code == 0, result.output
    assert "no rerank.onnx" in result.output and "re-export" in result.output
    # auto without triton and without an engine re-ranks on the CPU
    assert count_mutual_matches(q, [q], backend="auto", bundle=bundle).tolist() == [1]


def test_trt_backend_without_an_engine_says_what_to_do(tiny_bundle: Path) -> None:
    q = np.ones((3, 128), np.float32)
    with pytest.raises((BundleError, BackendUnavailableError)) as info:
        count_mutual_matches(q, [q], backend="trt", bundle=Bundle.open(tiny_bundle))
    assert isinstance(info.value, FolInferError)
    assert "build-trt" in str(info.value) or "TensorRT" in str(info.value)


@pytest.mark.slow
def test_pipeline_re_ranks_with_the_bundle_graph(tiny_bundle: Path, tmp_path: Path) -> None:
    from sample_images import make_images

    from fol_infer.backends import open_encoder
    from fol_infer.index.build import BuildSettings, build_index
    from fol_infer.pipeline import Retriever

    make_images(tmp_path / "db", 5)
    queries = make_images(tmp_path / "q", 1, seed=1)
    bundle = Bundle.open(tiny_bundle)
    with open_encoder(bundle) as encoder:
        build_index(bundle, encoder, tmp_path / "db", tmp_path / "idx", BuildSettings(batch=5))
        cpu_settings, onnx_settings = RerankSettings(backend="cpu"), RerankSettings(backend="onnx")
        with Retriever(bundle, tmp_path / "idx", rerank=cpu_settings, encoder=encoder) as cpu:
            want = cpu.query(queries, top_k=5, rerank_k=5)
        with Retriever(bundle, tmp_path / "idx", rerank=onnx_settings, encoder=encoder) as graph:
            got = graph.query(queries, top_k=5, rerank_k=5)
    assert [r.reranked for r in got] == [r.reranked for r in want]
    assert any(h.matches > 0 for r in got for h in r.reranked or [])
    old = without_rerank_graph(tiny_bundle, tmp_path)
    with pytest.raises(BundleError, match="re-export"):
        Retriever(old, tmp_path / "idx", rerank=onnx_settings)


# --- on a GPU with onnxruntime-gpu only -------------------------------------------------------


@pytest.mark.gpu
def test_cuda_execution_provider_matches_the_cpu() -> None:
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA execution provider here (pip install onnxruntime-gpu)")
    rng = np.random.default_rng(5)
    model = build_rerank_model(256, 128).SerializeToString()
    gpu = OnnxReranker(model, providers=[CUDA], chunk=4)
    assert gpu.provider == CUDA
    q = rng.standard_normal((250, 128)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    cands = [(q[:n] + 0.3 * small_ints(rng, n, 128)).astype(np.float16) for n in (250, 100, 7)]
    cands += [small_ints(rng, 256, 128).astype(np.float16)]
    got = gpu.count_many([q], [cands], 0.7)[0]
    np.testing.assert_array_equal(got, count_mutual_matches_many_cpu([q], [cands], 0.7)[0])
