"""Export time, ONNX-vs-PyTorch parity and CPU latency for real-size random checkpoints.

    python benchmarks/export_parity.py --arch vits14 vitb14 --resolution 322 --json PATH

For each architecture: make a seeded UNTRAINED checkpoint, export it (timed), compare onnx with
torch on the bundle's reference inputs plus extra random images, and time batch-1 latency of
both in this same process (the ratio is what to read: machines are noisy).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import parser, write_report

from fol_infer.backends import open_encoder
from fol_infer.bundle import Bundle
from fol_infer.export.onnx import export_bundle
from fol_infer.export.reference import reference_images
from fol_infer.model.checkpoint import make_checkpoint
from fol_infer.parity import compare


def latency_ms(encoder, image: np.ndarray, repeats: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    encoder.encode(image)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        encoder.encode(image)
        times.append((time.perf_counter() - start) * 1e3)
    return {"p50": statistics.median(times), "min": min(times), "max": max(times)}


def run(arch: str, resolution: int, work: Path, repeats: int, extra: int) -> dict[str, object]:
    ckpt = make_checkpoint(arch, seed=0, out=work / f"{arch}.pth")
    start = time.perf_counter()
    folder = export_bundle(ckpt, work / f"{arch}-{resolution}", resolution, force=True)
    export_s = time.perf_counter() - start
    bundle = Bundle.open(folder)
    torch_enc, onnx_enc = open_encoder(bundle, "torch"), open_encoder(bundle, "onnx")
    images = np.concatenate([reference_images((resolution, resolution), 2 + extra)])
    ref = torch_enc.encode(images)
    assert ref.local is not None
    reference = {
        "confidence": ref.global_.confidence,
        "global": ref.descriptors,
        "tokens": ref.local.tokens,
        "count": ref.local.counts,
        "region_mask": ref.local.region_mask,
    }
    parity = compare(reference, onnx_enc.encode(images)).to_dict()
    one = images[:1]
    t_torch = latency_ms(torch_enc, one, repeats)
    t_onnx = latency_ms(onnx_enc, one, repeats)
    return {
        "arch": arch,
        "resolution": resolution,
        "export_seconds": round(export_s, 1),
        "parity": parity,
        "latency_ms_batch1": {"torch": t_torch, "onnx": t_onnx},
        "onnx_over_torch_p50": t_onnx["p50"] / t_torch["p50"],
    }


def options() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("--arch", nargs="+", default=["vits14", "vitb14"])
    p.add_argument("--resolution", type=int, default=322)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--extra-images", type=int, default=14)
    return p


def main() -> None:
    args = options().parse_args()
    import torch

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch:
            r = run(arch, args.resolution, Path(tmp), args.repeats, args.extra_images)
            results.append(r)
            p, lat = r["parity"], r["latency_ms_batch1"]
            print(
                f"{arch}/{args.resolution}: export {r['export_seconds']} s | "
                f"global min cos {p['min_global_cosine']:.7f} | "
                f"token max diff {p['max_token_diff']:.1e} | "
                f"counts {p['count_agreement']:.0%} | positions {p['position_agreement']:.0%} "
                f"({p['boundary_ties']} images tie at the 225th place; untied "
                f"{p['untied_position_agreement']:.0%}) | "
                f"batch-1 p50 torch {lat['torch']['p50']:.0f} ms, onnx {lat['onnx']['p50']:.0f} ms "
                f"-> onnx/torch {r['onnx_over_torch_p50']:.2f}x",
                flush=True,
            )
    report = {
        "torch_threads": torch.get_num_threads(),
        "weights": "UNTRAINED seeded random checkpoints (make-checkpoint)",
        "results": results,
    }
    write_report(args.json, report)


if __name__ == "__main__":
    main()
