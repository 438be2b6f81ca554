"""Which backend re-ranks, and the one entry point that checks inputs before handing them on.

``score_many`` validates its inputs once, then hands them to the backend its `RerankSettings`
names (``count_mutual_matches`` / ``count_mutual_matches_many`` build the settings for you):
``cpu`` (numpy, bounded memory), ``triton`` (CUDA GPU), ``onnx`` (the bundle's rerank.onnx in
ONNX Runtime, CUDA or CPU), ``trt`` (the bundle's rerank engine), ``torch`` (the published
formulation, kept as the baseline), or ``auto``: triton when a working CUDA GPU is there, else
the bundle's rerank engine when TensorRT loads it (Jetson), else cpu. Backends are imported
lazily, so importing this package never pulls in torch, triton or tensorrt.
``count_mutual_matches_certified`` gives the same scores from int8 database tokens plus the
few float32 rows that their error bound cannot decide (``certified.py``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from functools import cache
from typing import TYPE_CHECKING

import numpy as np

from fol_infer.choices import RerankBackend
from fol_infer.errors import BackendUnavailableError, UsageError
from fol_infer.files.integrity import all_finite
from fol_infer.rerank.cpu import count_mutual_matches_many_cpu
from fol_infer.rerank.settings import DEFAULT_THRESHOLD, RerankSettings

if TYPE_CHECKING:
    from fol_infer.bundle import Bundle

_GPU_INSTALL_HINT = (
    "install triton and a CUDA build of torch (pip install 'fol-infer[gpu]') on a machine with "
    "an NVIDIA GPU, or use backend='cpu'"
)
_log = logging.getLogger(__name__)
_fallback_noted = False  # the auto -> cpu notice is logged once per process
NO_NVIDIA_GPU = "no NVIDIA GPU found"

Many = Callable[[list[np.ndarray], list[list[np.ndarray]], RerankSettings], list[np.ndarray]]


def count_mutual_matches(
    query: np.ndarray,
    candidates: Sequence[np.ndarray],
    threshold: float = DEFAULT_THRESHOLD,
    backend: RerankBackend | str = RerankBackend.AUTO,
    bundle: Bundle | None = None,
) -> np.ndarray:
    """Score of each candidate against one query: int64 (K,).

    ``query`` is (Nq, D) and each candidate (Nr_k, D), float32 or float16 (up-cast to float32
    before any product); lengths may differ and may be 0. A score is the number of pairs
    (i, j(i)) with i(j(i)) == i and S[i, j(i)] > threshold, where S = Q R^T and argmax ties go
    to the lowest index. ``bundle`` supplies rerank.onnx (``onnx``; without one the graph is
    built in memory) and the rerank engine (``trt``, and ``auto`` where TensorRT is the GPU
    path). Raises ValueError on NaN/Inf or mis-shaped tokens, UsageError on an unknown backend
    or a threshold outside [-1, 1) (tokens are unit vectors: S is a cosine),
    BackendUnavailableError when an explicitly chosen backend cannot run here, BundleError when
    the bundle lacks what the backend runs.
    """
    return count_mutual_matches_many([query], [candidates], threshold, backend, bundle)[0]


def count_mutual_matches_many(
    queries: Sequence[np.ndarray],
    candidate_lists: Sequence[Sequence[np.ndarray]],
    threshold: float = DEFAULT_THRESHOLD,
    backend: RerankBackend | str = RerankBackend.AUTO,
    bundle: Bundle | None = None,
) -> list[np.ndarray]:
    """``count_mutual_matches`` for several queries at once, each with its own candidates.

    Batching lets a backend spread all (query, candidate) pairs over every core or the GPU.
    """
    settings = RerankSettings(threshold, RerankBackend.parse(backend, "re-ranking backend"))
    return score_many(queries, candidate_lists, settings, bundle)


def score_many(
    queries: Sequence[np.ndarray],
    candidate_lists: Sequence[Sequence[np.ndarray]],
    settings: RerankSettings,
    bundle: Bundle | None = None,
) -> list[np.ndarray]:
    """Match counts under ``settings``: inputs checked once, then handed to its backend
    (``bundle``: where the onnx and trt backends find rerank.onnx and its engine)."""
    qs, cls = _validated(queries, candidate_lists)
    scores = _backend(settings.backend, bundle)(qs, cls, settings)
    return [np.asarray(s, np.int64).reshape(len(c)) for s, c in zip(scores, cls, strict=True)]


def rerank_order(scores: np.ndarray) -> np.ndarray:
    """Permutation putting candidates by score, descending; equal scores keep their global rank.

    ``scores`` is in global-rank order, so a stable sort is exactly the spec's tie rule.
    """
    s = np.asarray(scores)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D (one per candidate), got shape {s.shape}")
    return np.argsort(-s.astype(np.float64), kind="stable")


def _validated(
    queries: Sequence[np.ndarray], candidate_lists: Sequence[Sequence[np.ndarray]]
) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Arrays as given (no copies), after checking shapes, dtypes and finiteness once each."""
    if len(queries) != len(candidate_lists):
        raise ValueError(
            f"{len(queries)} queries but {len(candidate_lists)} candidate lists: pass one list "
            "of candidates per query"
        )
    checked: set[int] = set()
    qs = [_checked(q, f"query {qi}", None, checked) for qi, q in enumerate(queries)]
    cls = [
        [
            _checked(c, f"candidate {ki} of query {qi}", qs[qi].shape[1], checked)
            for ki, c in enumerate(cands)
        ]
        for qi, cands in enumerate(candidate_lists)
    ]
    return qs, cls


def _checked(a: np.ndarray, name: str, dim: int | None, checked: set[int]) -> np.ndarray:
    """``a`` as an array if (N, dim), float16/float32 and finite; else ValueError naming it."""
    arr = np.asarray(a)
    if arr.ndim != 2 or (dim is not None and arr.shape[1] != dim):
        want = f"(N, {dim})" if dim is not None else "(N, D)"
        raise ValueError(f"{name} must be a {want} token array, got shape {arr.shape}")
    if arr.dtype not in (np.float16, np.float32):
        raise ValueError(f"{name} must hold float16 or float32 tokens, got {arr.dtype}")
    if id(arr) not in checked and arr.size:
        if not all_finite(arr):
            raise ValueError(f"{name} contains NaN or Inf values: its tokens are corrupt")
        checked.add(id(arr))
    return arr


def _cpu(qs: list[np.ndarray], cls: list[list[np.ndarray]], s: RerankSettings) -> list[np.ndarray]:
    return count_mutual_matches_many_cpu(
        qs, cls, s.threshold, block_bytes=s.block_bytes, workers=s.workers
    )


def _backend(name: RerankBackend, bundle: Bundle | None) -> Many:
    """The scoring function for a backend; 'auto' resolves (and may notice) here."""
    if name == RerankBackend.CPU:
        return _cpu
    if name == RerankBackend.TORCH:
        return _torch_backend()
    if name == RerankBackend.ONNX:
        return _onnx_backend(bundle)
    if name == RerankBackend.TRT:
        return _trt_backend(bundle)
    reason = _triton_unavailable_reason()
    if reason is None:
        from fol_infer.rerank.triton_kernel import count_mutual_matches_many_triton

        return lambda qs, cls, s: count_mutual_matches_many_triton(qs, cls, s.threshold)
    if name == RerankBackend.TRITON:
        raise BackendUnavailableError(
            f"re-ranking backend 'triton' is unavailable ({reason}): {_GPU_INSTALL_HINT}"
        )
    engine = ""
    if bundle is not None:
        trt_reason = _trt_unavailable_reason(bundle)
        if trt_reason is None:
            return _trt_backend(bundle)
        engine = f"; nor can the bundle's TensorRT rerank engine ({trt_reason})"
    global _fallback_noted
    if not _fallback_noted:
        _fallback_noted = True
        if reason == NO_NVIDIA_GPU:  # the expected case on a CPU machine: a note, not a warning
            _log.info("re-ranking on the CPU (no NVIDIA GPU on this machine)")
        else:
            _log.warning(
                "re-ranking on the CPU: this machine has an NVIDIA GPU but the triton kernel "
                "cannot run (%s)%s",
                reason,
                engine,
            )
    return _cpu


def _onnx_backend(bundle: Bundle | None) -> Many:
    """rerank.onnx of the bundle, or the same graph built in memory for the inputs' sizes."""
    from fol_infer.rerank.onnx_runner import adhoc_reranker, bundle_reranker

    def run(
        qs: list[np.ndarray], cls: list[list[np.ndarray]], s: RerankSettings
    ) -> list[np.ndarray]:
        if bundle is not None:
            return bundle_reranker(bundle).count_many(qs, cls, s.threshold)
        sets = [*qs, *(c for cands in cls for c in cands)]
        if not any(len(c) for c in cls):  # nothing to score: no graph needed
            return [np.zeros(len(c), np.int64) for c in cls]
        runner = adhoc_reranker(max(len(x) for x in sets), sets[0].shape[1])
        return runner.count_many(qs, cls, s.threshold)

    return run


def _trt_backend(bundle: Bundle | None) -> Many:
    """The bundle's TensorRT rerank engine (built by ``fol-infer build-trt``)."""
    if bundle is None:
        raise UsageError(
            "re-ranking backend 'trt' runs the bundle's TensorRT rerank engine: pass the bundle"
        )
    from fol_infer.rerank.trt_runner import bundle_trt_reranker

    runner = bundle_trt_reranker(bundle)
    return lambda qs, cls, s: runner.count_many(qs, cls, s.threshold)


def _trt_unavailable_reason(bundle: Bundle) -> str | None:
    """Why the bundle's rerank engine cannot run here, or None; cheap without TensorRT."""
    from fol_infer.rerank.trt_runner import trt_unavailable_reason

    return trt_unavailable_reason(bundle)


def _torch_backend() -> Many:
    """The published formulation, on the GPU when torch sees one."""
    if importlib.util.find_spec("torch") is None:
        raise BackendUnavailableError(
            "re-ranking backend 'torch' needs torch: pip install 'fol-infer[export]', "
            "or use backend='cpu'"
        )
    import torch

    from fol_infer.rerank.torch_published import count_mutual_matches_many_torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return lambda qs, cls, s: count_mutual_matches_many_torch(qs, cls, s.threshold, device=device)


@cache
def _triton_unavailable_reason() -> str | None:
    """Why the triton backend cannot run here, or None when it passed a smoke test.

    The device-node check comes first so that a CPU-only machine with torch installed never
    imports torch here. Then the kernel runs once on a tiny case with a known answer: any
    failure there (compiler, driver) means 'not working', and the auto notice says why.
    """
    if os.name == "posix" and not _nvidia_device_node():
        return NO_NVIDIA_GPU
    try:
        from fol_infer.rerank.triton_kernel import (
            count_mutual_matches_many_triton,
            triton_available,
        )

        usable, why = triton_available()
        if not usable:
            return why
        probe = np.eye(2, 4, dtype=np.float32)
        got = count_mutual_matches_many_triton([probe], [[probe, probe[:1]]], DEFAULT_THRESHOLD)
        if [int(x) for x in got[0]] != [2, 1]:
            return f"its smoke test scored {list(got[0])} instead of [2, 1]"
    except Exception as exc:  # any failure means the optional engine is unusable here
        return f"{type(exc).__name__}: {exc}"
    return None


def _nvidia_device_node() -> bool:
    """An NVIDIA GPU device node exists: discrete (/dev/nvidiactl), Jetson, or WSL2 (/dev/dxg)."""
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvhost-ctrl-gpu", "/dev/dxg"))
