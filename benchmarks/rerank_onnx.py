"""The re-rank graph (rerank.onnx) against the numpy CPU re-ranker and the sgemm roofline, all
measured in this run on this machine; then, with --gpu, ONNX Runtime's CUDA provider and the
Triton kernel on the same data.

    python benchmarks/rerank_onnx.py [--quick] [--json PATH] [--gpu]

Data as in rerank_cpu.py: one query, K candidates of 3,300..3,500 random unit tokens with
near-duplicates of the query planted (so matches and their argmax work exist). The graph is
the bundle's: capacity 3,600 tokens (every set padded to it), 128-d, float32 candidates; it is
built here with the same builder export uses. The roofline is the sgemm time of the real
(unpadded) products at the rate of one large float32 matmul measured in this run; the graph's
own products are larger by the padding (reported). Times are the best of a few runs.

Peak memory per chunk size is measured in a fresh subprocess per size: the peak resident set
(VmHWM, reset through /proc/self/clear_refs once the inputs exist and the session is created)
minus the resident set just before, so the inputs and the session itself are not counted:
what remains is what scoring 2 chunks of candidates adds (ONNX Runtime's arena included).

--gpu: sections that skip, saying why, where a provider is missing. TensorRT is not measured
by this script (its engine is built per GPU by fol-infer build-trt; see export/README.md).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import parser, write_report  # noqa: E402
from rerank_cpu import Spec, _status_kib, best_run, make_case, pair_flops, sgemm_flops  # noqa: E402

from fol_infer.rerank.cpu import count_mutual_matches_many_cpu  # noqa: E402
from fol_infer.rerank.graph import build_rerank_model  # noqa: E402
from fol_infer.rerank.onnx_runner import CPU, CUDA, OnnxReranker  # noqa: E402

CAPACITY, DIM, THRESHOLD = 3600, 128, 0.7
TOKENS = (3300, 3500)


def reranker(chunk: int, providers: list[str]) -> OnnxReranker:
    model = build_rerank_model(CAPACITY, DIM).SerializeToString()
    return OnnxReranker(model, providers=providers, chunk=chunk)


def cpu_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    rate_start, _ = sgemm_flops(2048)
    ks = (10, 20) if args.quick else (10, 100)
    runner = reranker(args.chunk, [CPU])
    runner.count_many(*make_case(0, Spec("", 1, 1, 1, 1), TOKENS), THRESHOLD)  # warm-up
    rows = []
    for k in ks:
        queries, lists = make_case(k, Spec(f"K={k}", 1, k, 1, 1), TOKENS)
        repeats = 1 if k >= 100 else 3
        t_np, u_np, want = best_run(
            lambda q=queries, c=lists: count_mutual_matches_many_cpu(q, c, THRESHOLD), repeats
        )
        t_onnx, u_onnx, got = best_run(
            lambda q=queries, c=lists: runner.count_many(q, c, THRESHOLD), repeats
        )
        same = all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
        flops = pair_flops(queries, lists)
        rows.append(
            {
                "case": f"K={k}",
                "numpy_s": t_np,
                "numpy_cpu_util": u_np,
                "onnx_s": t_onnx,
                "onnx_cpu_util": u_onnx,
                "onnx_over_numpy": t_onnx / t_np,
                "real_gflop": flops / 1e9,
                "padded_gflop": 2 * k * CAPACITY * CAPACITY * DIM / 1e9,
                "counts_equal": same,
                "matches_sum": int(want[0].sum()),
            }
        )
        print(
            f"  K={k:<4} numpy {t_np:7.2f} s  onnx {t_onnx:7.2f} s  ({t_onnx / t_np:.1f}x numpy)"
            f"  counts equal: {same}",
            flush=True,
        )
    rate = max(rate_start, sgemm_flops(2048)[0])
    for row in rows:
        roof = row["real_gflop"] * 1e9 / rate
        row.update(
            roofline_s=roof,
            numpy_over_roofline=row["numpy_s"] / roof,
            onnx_over_roofline=row["onnx_s"] / roof,
        )
    print(f"  sgemm {rate / 1e9:.0f} GFLOP/s (2048^3, best of start and end of the run)")
    return rows


def peak_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for chunk in (1, 2, 4, 8) if args.quick else (1, 2, 4, 8, 16):
        cmd = [sys.executable, __file__, "--_peak", str(chunk)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        extra = int(out.split()[-1])
        rows.append({"chunk": chunk, "peak_extra_mib": extra / 2**20})
        print(f"  chunk {chunk:>2}: +{extra / 2**20:7.0f} MiB peak resident", flush=True)
    return rows


def _peak_main(chunk: int) -> None:
    """Child of peak_rows: 2 chunks' worth of candidates, scored once by a new session."""
    queries, lists = make_case(1, Spec("", 1, 2 * chunk, 1, 1), TOKENS)
    runner = reranker(chunk, [CPU])
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    runner.count_many(queries, lists, THRESHOLD)
    print((_status_kib("VmHWM") - before) * 1024)


def gpu_rows(args: argparse.Namespace) -> dict[str, Any]:
    """ONNX Runtime CUDA EP and the Triton kernel, K = 10 and 100, fp16 candidates."""
    out: dict[str, Any] = {}
    cases = {k: make_case(k, Spec("", 1, k, 1, 1), TOKENS) for k in (10, 100)}
    cases = {
        k: (q, [[c.astype(np.float16) for c in cs] for cs in ls]) for k, (q, ls) in cases.items()
    }
    want = {k: count_mutual_matches_many_cpu(q, ls, THRESHOLD) for k, (q, ls) in cases.items()}
    missing = _onnx_cuda_missing()
    if missing:
        out["onnx_cuda"] = {"skipped": missing}
    else:
        runner = reranker(args.gpu_chunk, [CUDA, CPU])
        rows = []
        for k, (q, ls) in cases.items():
            runner.count_many(q, ls, THRESHOLD)
            t, _, got = best_run(lambda q=q, ls=ls: runner.count_many(q, ls, THRESHOLD), 3)
            same = all(np.array_equal(a, b) for a, b in zip(got, want[k], strict=True))
            rows.append({"k": k, "seconds": t, "counts_equal": same, "chunk": args.gpu_chunk})
        out["onnx_cuda"] = {"provider": runner.provider, "rows": rows}
    try:
        from fol_infer.rerank.triton_kernel import (
            count_mutual_matches_many_triton,
            triton_available,
        )

        usable, why = triton_available()
    except Exception as exc:  # no torch/triton: the section says so
        usable, why = False, f"{type(exc).__name__}: {exc}"
    if not usable or os.environ.get("TRITON_INTERPRET") == "1":
        out["triton"] = {"skipped": why or "the Triton interpreter is not a GPU"}
    else:
        import torch

        rows = []
        for k, (q, ls) in cases.items():
            count_mutual_matches_many_triton(q, ls, THRESHOLD)

            def run(q: Any = q, ls: Any = ls) -> Any:
                r = count_mutual_matches_many_triton(q, ls, THRESHOLD)
                torch.cuda.synchronize()
                return r

            t, _, got = best_run(run, 3)
            same = all(np.array_equal(a, b) for a, b in zip(got, want[k], strict=True))
            rows.append({"k": k, "seconds": t, "counts_equal": same})
        out["triton"] = {"rows": rows}
    for name, section in out.items():
        print(f"  {name}: {section}", flush=True)
    return out


def _onnx_cuda_missing() -> str:
    """Why ONNX Runtime's CUDA provider cannot be measured here, or ""."""
    try:
        import onnx  # noqa: F401  (builds the graph)
        import onnxruntime as ort
    except ImportError as exc:
        return f"{exc.name} is not installed here"
    if CUDA not in ort.get_available_providers():
        return "onnxruntime has no CUDA execution provider here (pip install onnxruntime-gpu)"
    return ""


def options() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("--quick", action="store_true", help="K = 10 and 20, fewer chunk sizes")
    p.add_argument("--chunk", type=int, default=8, help="CPU chunk for the timed rows")
    p.add_argument("--gpu", action="store_true", help="also the GPU section")
    p.add_argument("--gpu-only", action="store_true", help="only the GPU section")
    p.add_argument("--gpu-chunk", type=int, default=16)
    p.add_argument("--_peak", type=int, help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = options().parse_args()
    if args._peak:
        _peak_main(args._peak)
        return
    result: dict[str, Any] = {"capacity": CAPACITY, "tokens": list(TOKENS)}
    start = time.perf_counter()
    if not args.gpu_only:
        print("CPU: numpy re-ranker vs rerank.onnx in ONNX Runtime (CPU provider)", flush=True)
        result["cpu"] = cpu_rows(args)
        print("peak memory of rerank.onnx per chunk size (2 chunks of candidates)", flush=True)
        result["peak_memory"] = peak_rows(args)
    if args.gpu or args.gpu_only:
        print("GPU: ONNX Runtime CUDA provider, Triton kernel (fp16 candidates)", flush=True)
        result["gpu"] = gpu_rows(args)
    result["seconds"] = time.perf_counter() - start
    write_report(args.json, result)


if __name__ == "__main__":
    main()
