"""The fused Triton re-ranker against the float64 reference of spec section 7 (tests/).

CPU tests run the kernel under TRITON_INTERPRET=1 on small shapes; token values are multiples
of 1/8 (or 0/1), so every dot product is exact in float16 inputs + float32 sums and counts must
match the reference exactly, ties included. Tests marked `gpu` compile the kernel for a CUDA GPU
and are skipped without one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
HAS_CUDA = torch.cuda.is_available()
REPO = Path(__file__).resolve().parents[1]
# triton picks interpreter or compiler once, at its first import: interpreter where no GPU is.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from rerank_reference import reference_score as reference  # noqa: E402

from fol_infer.errors import BackendUnavailableError, UsageError  # noqa: E402
from fol_infer.rerank import gpu_tokens  # noqa: E402
from fol_infer.rerank import triton_kernel as tk  # noqa: E402


@pytest.fixture(autouse=True)
def _one_triton_mode_per_process(request: pytest.FixtureRequest) -> None:
    """CPU tests need the interpreter, `gpu` tests compiled kernels; a process has one mode."""
    gpu = request.node.get_closest_marker("gpu") is not None
    if gpu and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU (none visible to torch)")
    if gpu == tk.interpreter_active():
        pytest.skip(
            "triton interprets kernels in this process (TRITON_INTERPRET=1): run these without it"
            if gpu
            else "triton compiles kernels in this process: run with TRITON_INTERPRET=1 for these"
        )


def eighths(rng: np.random.Generator, n: int, dim: int = 128, span: int = 3) -> np.ndarray:
    """Tokens exact in float16 whose dot products are exact in float32; many ties."""
    return (rng.integers(-span, span + 1, size=(n, dim)) / 8).astype(np.float16)


def expected(queries, candidate_lists, threshold):
    return [
        np.array([reference(q, c, threshold) for c in cands], np.int64)
        for q, cands in zip(queries, candidate_lists, strict=True)
    ]


def assert_counts_equal(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == np.int64
        np.testing.assert_array_equal(g, w)


SMALL = tk.KernelConfig(block_m=16, block_n=32, num_warps=1, num_stages=1, block_count=16)
SHUFFLE = tk.KernelConfig(block_m=16, block_n=32, num_stages=1, columns="shuffle")
HYBRID = tk.KernelConfig(block_m=32, block_n=16, num_stages=1, columns="hybrid")


@pytest.mark.parametrize(
    ("config", "threshold"),
    [
        (None, 0.7),
        (None, -100.0),
        (SMALL, 0.7),
        (SHUFFLE, 0.7),
        (SHUFFLE, -100.0),
        (HYBRID, 0.7),
        (HYBRID, -100.0),
    ],
    ids=[
        "mma-0.7",
        "mma-all",
        "16x32-0.7",
        "shuffle-0.7",
        "shuffle-all",
        "hybrid-0.7",
        "hybrid-all",
    ],
)
def test_counts_match_reference_for_lengths_across_tiles(config, threshold) -> None:
    rng = np.random.default_rng(1)
    queries = [eighths(rng, n) for n in (33, 1, 16, 70)]
    sizes = [[32, 1, 65, 0, 17], [5], [100, 31], [40, 40]]
    cands = [[eighths(rng, n) for n in row] for row in sizes]
    got = tk.count_mutual_matches_many_triton(queries, cands, threshold, config=config)
    assert_counts_equal(got, expected(queries, cands, threshold))
    if threshold < 0:  # every mutual pair counts: the check exercised the argmax logic
        assert sum(int(g.sum()) for g in got) > 0


def test_ties_go_to_lowest_index_across_tiles_and_programs() -> None:
    """0/1 tokens in 16 dims: most maxima are shared, across column tiles and row programs."""
    rng = np.random.default_rng(2)
    q = rng.integers(0, 2, size=(70, 16)).astype(np.float16)
    r = rng.integers(0, 2, size=(90, 16)).astype(np.float16)
    q[40], r[50] = q[3], r[2]  # exact duplicates in another row block / column tile
    cands = [[r, r[::-1].copy()]]
    for config, threshold in ((None, -1.0), (None, 3.0), (SHUFFLE, -1.0), (HYBRID, 3.0)):
        got = tk.count_mutual_matches_many_triton([q], cands, threshold, config=config)
        assert_counts_equal(got, expected([q], cands, threshold))


def test_threshold_pruning_keeps_counts_exact() -> None:
    """Only the middle block of the candidate (copies of query tokens) can pass: whole tiles,
    rows and columns skip their argmax and atomics, the others not. One threshold equals an
    attained S (strictness)."""
    rng = np.random.default_rng(16)
    q = eighths(rng, 70, span=1)
    c = np.concatenate([-q[::2], q[5:25], -q[1::2]])
    s = q.astype(np.float64) @ c.astype(np.float64).T
    attained = float(np.median(s[s > 0.5]))
    tile_max = [s[i : i + 32, j : j + 32].max() for i in range(0, 70, 32) for j in range(0, 90, 32)]
    for config in (None, SHUFFLE, HYBRID):
        for threshold in (1.0, attained):
            assert min(tile_max) <= threshold < max(tile_max)
            got = tk.count_mutual_matches_many_triton([q], [[c]], threshold, config=config)
            assert_counts_equal(got, expected([q], [[c]], threshold))
            assert 0 < got[0][0] <= 20  # the copies, at most


def test_identical_tokens_pair_only_their_lowest_indices() -> None:
    """All S equal: row 0 and column 0 own each other, nothing else is mutual -> exactly 1
    (the published code's squeeze would score such a candidate 0; the spec says 1)."""
    a = np.full((1, 128), 1 / 8, np.float16)
    q, r = np.repeat(a, 37, axis=0), np.repeat(a, 45, axis=0)
    got = tk.count_mutual_matches_many_triton([q], [[r]], threshold=1.0)  # S = 2 > 1
    assert got[0].tolist() == [reference(q, r, 1.0)] == [1]


def test_threshold_is_strict_and_exact_beyond_float32() -> None:
    """S == 1.0 exactly: not counted at 1.0, counted at 1 - 1e-12 (float32 rounds that to 1.0,
    so a naive float32 comparison would drop it)."""
    rng = np.random.default_rng(3)
    q = np.zeros((20, 128), np.float16)
    q[np.arange(20), rng.permutation(128)[:20]] = 1.0  # one-hot rows: S in {0, 1}
    r = q[rng.permutation(20)]
    at, below = (tk.count_mutual_matches_many_triton([q], [[r]], t)[0][0] for t in (1.0, 1 - 1e-12))
    assert at == reference(q, r, 1.0) == 0
    assert below == reference(q, r, 1 - 1e-12) == 20


def test_empty_sets_and_single_tokens() -> None:
    rng = np.random.default_rng(4)
    one, many = eighths(rng, 1), eighths(rng, 40)
    empty = np.zeros((0, 128), np.float16)
    queries = [empty, one, many, many]
    cands = [[many, one], [one, empty, many], [empty, np.zeros(0, np.float16)], []]
    got = tk.count_mutual_matches_many_triton(queries, cands)
    assert_counts_equal(got, expected(queries, cands, 0.7))
    assert got[3].shape == (0,)
    assert tk.count_mutual_matches_many_triton([], []) == []


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e5])
@pytest.mark.parametrize("side", ["query", "candidate"])
def test_non_finite_tokens_raise(bad: float, side: str) -> None:
    rng = np.random.default_rng(5)
    good = eighths(rng, 20).astype(np.float32)
    broken = good.copy()
    broken[7, 3] = bad  # 1e5 is finite in float32 but overflows float16
    q, c = (broken, good) if side == "query" else (good, broken)
    with pytest.raises(ValueError, match=f"{side} 0 holds NaN or infinite"):
        tk.count_mutual_matches_many_triton([q], [[c]])


def test_many_launches_equal_one() -> None:
    rng = np.random.default_rng(6)
    queries = [eighths(rng, n) for n in (20, 45)]
    cands = [[eighths(rng, n) for n in (10, 50, 3, 33)] for _ in queries]
    one = tk.count_mutual_matches_many_triton(queries, cands)
    split = tk.count_mutual_matches_many_triton(queries, cands, max_pairs_per_launch=3)
    assert_counts_equal(split, one)
    assert_counts_equal(one, expected(queries, cands, 0.7))


def test_shared_candidate_objects_give_the_same_counts_as_copies() -> None:
    rng = np.random.default_rng(7)
    queries = [eighths(rng, 30), eighths(rng, 25)]
    shared = eighths(rng, 40)
    got = tk.count_mutual_matches_many_triton(queries, [[shared], [shared, shared]])
    copies = [[shared.copy()], [shared.copy(), shared.copy()]]
    assert_counts_equal(got, tk.count_mutual_matches_many_triton(queries, copies))


def test_narrow_tokens_are_padded_to_a_kernel_width() -> None:
    rng = np.random.default_rng(8)
    q, r = eighths(rng, 20, dim=24), eighths(rng, 30, dim=24)
    got = tk.count_mutual_matches_many_triton([q], [[r]], threshold=-10.0)
    assert got[0].tolist() == [reference(q, r, -10.0)]


def test_bad_arguments_raise_usage_errors() -> None:
    rng = np.random.default_rng(9)
    q = eighths(rng, 5)
    with pytest.raises(UsageError, match="threshold"):
        tk.count_mutual_matches_many_triton([q], [[q]], threshold=float("nan"))
    with pytest.raises(UsageError, match="columns one of"):
        tk.KernelConfig(columns="rows")
    with pytest.raises(UsageError, match="powers of two"):
        tk.KernelConfig(block_n=48)
    with pytest.raises(UsageError, match="candidate lists"):
        tk.count_mutual_matches_many_triton([q], [])
    with pytest.raises(UsageError, match="use one encoder"):
        tk.count_mutual_matches_many_triton([q], [[eighths(rng, 5, dim=64)]])


class DictSource:
    """A stand-in for the token store: only `get(ids)` is used."""

    def __init__(self, sets: list[np.ndarray]):
        self.sets = sets

    def get(self, ids):
        return [self.sets[i] for i in ids]


def _database(rng: np.random.Generator, n: int = 9) -> list[np.ndarray]:
    return [eighths(rng, int(k)) for k in rng.integers(0, 60, size=n)]


def test_grid_over_resident_tokens_matches_reference() -> None:
    rng = np.random.default_rng(10)
    db = _database(rng)
    resident = gpu_tokens.ResidentTokens.from_source(DictSource(db), len(db), device="cpu", batch=4)
    exact = gpu_tokens.ResidentTokens.from_source(
        DictSource(db), len(db), device="cpu", token_counts=np.array([len(t) for t in db])
    )
    assert (
        exact.packed.tokens.shape[0] == sum(len(t) for t in db) == resident.packed.tokens.shape[0]
    )
    queries = [eighths(rng, 35), eighths(rng, 12)]
    ids = np.array([[3, 0, -1, 8, 99], [1, 1, 2, 5, 4]])
    rows = resident.rows(torch.as_tensor(ids))
    packed_q = gpu_tokens.pack_tokens(queries, "cpu")
    got = tk.count_mutual_matches_grid(packed_q, resident.packed, rows).numpy()
    raw = tk.count_mutual_matches_grid(packed_q, resident.packed, ids).numpy()  # 99: no set
    want = [
        [reference(q, db[i], 0.7) if 0 <= i < len(db) else 0 for i in row]
        for q, row in zip(queries, ids, strict=True)
    ]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(raw, want)


def test_resident_load_rejects_oversized_images() -> None:
    rng = np.random.default_rng(11)
    db = [eighths(rng, 30), eighths(rng, 50)]
    with pytest.raises(UsageError, match="token_counts"):
        gpu_tokens.ResidentTokens.from_source(
            DictSource(db), 2, device="cpu", max_tokens_per_image=32
        )


def test_stager_alternates_slots_without_mixing_batches() -> None:
    rng = np.random.default_rng(12)
    db = _database(rng, 12)
    stager = gpu_tokens.PinnedStager(DictSource(db), device="cpu", rows=40)  # forces regrowth
    queries = [eighths(rng, 30), eighths(rng, 20)]
    packed_q = gpu_tokens.pack_tokens(queries, "cpu")
    batches = [
        np.array([[0, 5, 5], [11, -1, 3]]),
        np.array([[2, 7, 1], [6, 6, 9]]),
        np.array([[4, 10, 8], [0, 0, 0]]),
    ]
    staged = [stager.stage(ids) for ids in batches]  # all staged before any is used
    for (packed_c, rows), ids in zip(staged[1:], batches[1:], strict=True):
        got = tk.count_mutual_matches_grid(packed_q, packed_c, rows).numpy()
        want = [
            [reference(q, db[i], 0.7) if i >= 0 else 0 for i in row]
            for q, row in zip(queries, ids, strict=True)
        ]
        np.testing.assert_array_equal(got, want)


def test_stager_rejects_non_finite_source_tokens() -> None:
    rng = np.random.default_rng(13)
    db = _database(rng, 4)
    db[2] = eighths(rng, 10).astype(np.float32)
    db[2][4, 4] = np.nan
    stager = gpu_tokens.PinnedStager(DictSource(db), device="cpu")
    with pytest.raises(ValueError, match="database image 2"):
        stager.stage(np.array([[0, 2, 3]]))


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan, -np.nan, None])
def test_fp16_non_finite_scan_matches_isfinite(bad) -> None:
    a = np.array([0.0, -0.0, 65504, -65504, 6e-8, -6e-8, 1.0], np.float16)
    if bad is not None:
        a[3] = bad
    assert gpu_tokens.has_non_finite_fp16(a) == (not np.isfinite(a).all())


def test_images_per_gib_counts_padded_width() -> None:
    per = gpu_tokens.images_per_gib(3400, 128)
    assert per * 3400 * 128 * 2 <= 2**30 < (per + 1) * (3400 * 128 * 2 + 12)
    assert gpu_tokens.images_per_gib(3400, 100) == per  # 100 dims are stored as 128


def test_availability_is_reported_with_a_reason() -> None:
    ok, why = tk.triton_available()
    assert isinstance(ok, bool) and why
    assert not ok  # these tests run interpreted: never a choice for `auto`


def test_without_a_gpu_the_error_is_one_actionable_line(monkeypatch) -> None:
    monkeypatch.setattr(tk, "interpreter_active", lambda: False)
    monkeypatch.setattr(tk, "triton_available", lambda: (False, "no CUDA GPU visible to torch"))
    rng = np.random.default_rng(14)
    q = eighths(rng, 4)
    with pytest.raises(BackendUnavailableError) as err:
        tk.count_mutual_matches_many_triton([q], [[q]])
    assert "\n" not in str(err.value) and "backend='cpu'" in str(err.value)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        packed = gpu_tokens.pack_tokens([q], "cpu")
        tk.count_mutual_matches_grid(packed, packed, np.zeros((1, 1), np.int64))


def test_matches_the_cpu_backend_when_present() -> None:
    cpu = pytest.importorskip("fol_infer.rerank.cpu", reason="fol_infer.rerank.cpu not written yet")
    fn = getattr(cpu, "count_mutual_matches_many_cpu", None)
    if fn is None:
        pytest.skip("fol_infer.rerank.cpu has no count_mutual_matches_many_cpu")
    rng = np.random.default_rng(15)
    queries = [eighths(rng, n) for n in (40, 9)]
    cands = [[eighths(rng, n) for n in (50, 0, 33)], [eighths(rng, 70)]]
    got = tk.count_mutual_matches_many_triton(queries, cands)
    assert_counts_equal(got, [np.asarray(c, np.int64) for c in fn(queries, cands, 0.7)])


COMPILE_CHECK = """
import triton
from triton.backends.compiler import GPUTarget
from fol_infer.rerank import triton_kernel as tk

tiles, count = tk._kernels()
sig = dict(q_ptr="*fp16", r_ptr="*fp16", pair_qoff_ptr="*i64", pair_nq_ptr="*i32",
           pair_roff_ptr="*i64", pair_nr_ptr="*i32", row_arg_ptr="*i32", row_val_ptr="*fp32",
           col_key_ptr="*i64", row_stride="i32", col_stride="i32", row_blocks="i32",
           threshold="fp32", D="constexpr", BM="constexpr", BN="constexpr", COLUMNS="constexpr")
aligned = {(i,): [["tt.divisibility", 16]] for i, v in enumerate(sig.values()) if v[0] == "*"}
for cap, columns in ((90, "mma"), (90, "hybrid"), (90, "shuffle"), (80, "mma")):
    cfg = tk.KernelConfig(columns=columns)
    consts = dict(D=128, BM=cfg.block_m, BN=cfg.block_n, COLUMNS=columns)
    opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    k = triton.compile(triton.compiler.ASTSource(tiles, sig, consts, aligned),
                       target=GPUTarget("cuda", cap, 32), options=opts)
    print(cap, columns, "wgmma" in k.asm["ptx"])
sig = dict(row_arg_ptr="*i32", row_val_ptr="*fp32", col_key_ptr="*i64", pair_nq_ptr="*i32",
           counts_ptr="*i32", row_stride="i32", col_stride="i32", threshold="fp32",
           BLOCK="constexpr")
triton.compile(triton.compiler.ASTSource(count, sig, dict(BLOCK=1024)),
               target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
print("count ok")
"""


def test_kernels_compile_for_hopper_and_ampere_without_a_gpu() -> None:
    """The interpreter does not compile: ahead-of-time compilation (a fresh process, triton not
    interpreting) catches what only the compiler rejects, and that Hopper gets wgmma."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, "-c", COMPILE_CHECK], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.split("\n")
    assert lines[:5] == [
        "90 mma True",
        "90 hybrid True",
        "90 shuffle True",
        "80 mma False",
        "count ok",
    ]


# ------------------------------------------------------------------------------ GPU only
def torch_reference(q: torch.Tensor, r: torch.Tensor, threshold: float) -> int:
    """float32 S on the GPU (no TF32): exact for inputs whose dot products are exact."""
    if len(q) == 0 or len(r) == 0:
        return 0
    s = q.float() @ r.float().T
    j = s.argmax(dim=1)  # torch returns the first maximal index
    i = s.argmax(dim=0)
    rows = torch.arange(len(q), device=q.device)
    return int(((i[j] == rows) & (s[rows, j] > threshold)).sum())


@pytest.fixture
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.gpu
def test_gpu_counts_equal_fp32_reference_at_real_sizes(no_tf32) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)

    def tokens(n: int) -> torch.Tensor:
        v = torch.randint(-3, 4, (n, 128), device="cuda", generator=gen)
        return (v / 8).half()

    queries = [tokens(n) for n in (3400, 3391, 1)]
    cands = [[tokens(n) for n in (3400, 3600, 17, 0, 2900)] for _ in queries]
    for threshold, config in (
        (0.7, None),
        (-100.0, None),
        (0.7, tk.KernelConfig(columns="shuffle")),
        (0.7, tk.KernelConfig(columns="hybrid")),
    ):
        got = tk.count_mutual_matches_many_triton(queries, cands, threshold, config=config)
        want = [
            [torch_reference(q, c, threshold) for c in cs]
            for q, cs in zip(queries, cands, strict=True)
        ]
        assert [g.tolist() for g in got] == want


@pytest.mark.gpu
@pytest.mark.parametrize("columns", ["mma", "shuffle", "hybrid"])
def test_gpu_signed_zero_similarities_tie(columns: str) -> None:
    """Rows of -0.0 give S = -0.0, rows of +0.0 give +0.0: equal values, so every column
    belongs to row 0 and every row picks column 0 (only (0, 0) is mutual)."""
    q = torch.zeros(300, 128, device="cuda", dtype=torch.float16)
    q[::2] = -0.0
    r = torch.full((200, 128), 0.125, device="cuda", dtype=torch.float16)
    config = tk.KernelConfig(columns=columns)
    got = tk.count_mutual_matches_many_triton([q, q[1:]], [[r], [r]], -1.0, config=config)
    assert [int(g[0]) for g in got] == [torch_reference(q, r, -1.0), 1] == [1, 1]


@pytest.mark.gpu
def test_gpu_resident_grid_and_stager_agree_with_list_api(no_tf32) -> None:
    rng = np.random.default_rng(20)
    db = [eighths(rng, int(n)) for n in rng.integers(3000, 3601, size=24)]
    queries = [eighths(rng, 3400), eighths(rng, 3350)]
    ids = rng.integers(-1, len(db), size=(2, 10))
    resident = gpu_tokens.ResidentTokens.from_source(DictSource(db), len(db), device="cuda")
    packed_q = gpu_tokens.pack_tokens(queries, "cuda")
    grid = tk.count_mutual_matches_grid(packed_q, resident.packed, resident.rows(ids))
    stager = gpu_tokens.PinnedStager(DictSource(db), device="cuda")
    staged = []
    for shift in range(3):  # three batches queued back to back: slot reuse must wait
        packed_c, rows = stager.stage(np.roll(ids, shift, axis=1))
        staged.append(tk.count_mutual_matches_grid(packed_q, packed_c, rows))
    want = [
        [reference(q, db[i], 0.7) if i >= 0 else 0 for i in row]
        for q, row in zip(queries, ids, strict=True)
    ]
    assert grid.cpu().numpy().tolist() == want
    for shift, got in enumerate(staged):
        assert got.cpu().numpy().tolist() == np.roll(want, shift, axis=1).tolist()


@pytest.mark.gpu
def test_gpu_scratch_memory_does_not_grow_with_n_squared() -> None:
    n, k = 3400, 100
    q = gpu_tokens.pack_tokens([torch.randn(n, 128, device="cuda")], "cuda")
    c = gpu_tokens.pack_tokens([torch.randn(n, 128, device="cuda") for _ in range(k)], "cuda")
    rows = torch.arange(k, device="cuda")[None]
    tk.count_mutual_matches_grid(q, c, rows)  # compile outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    tk.count_mutual_matches_grid(q, c, rows)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    bound = k * (8 * (n + tk.GPU_CONFIG.block_m) + 8 * n) + 64 * k + 2**20  # buffers + tables
    assert extra <= bound < k * n * n * 2 // 100


@pytest.mark.gpu
def test_gpu_tensors_with_nan_raise() -> None:
    q = torch.randn(50, 128, device="cuda")
    q[3, 3] = float("nan")
    with pytest.raises(ValueError, match="query 0"):
        tk.count_mutual_matches_many_triton([q], [[torch.randn(40, 128, device="cuda")]])
