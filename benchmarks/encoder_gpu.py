"""PyTorch reference encoder on a CUDA GPU: latency fp32 vs fp16 autocast, and fp16 parity.

    python benchmarks/encoder_gpu.py --json encoder_gpu.json             # on a GPU machine
    python benchmarks/encoder_gpu.py --device cpu --arch tiny --dry-run  # logic check on a CPU

The baseline TensorRT engines must beat (issue 6: fp16 engine >= 4x torch fp32, batch 1), and
the first look at how fp16 treats FoL's sensitive layers (Sinkhorn, region TopK) on a GPU.
Weights are UNTRAINED seeded random ones.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import parser, write_report

from fol_infer.backends.base import EncoderOutput, GlobalOutput, LocalOutput
from fol_infer.export.reference import reference_images
from fol_infer.model.checkpoint import random_model
from fol_infer.model.graphs import GlobalGraph, LocalGraph
from fol_infer.parity import compare


def timed(fn, device: torch.device, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def run(arch: str, resolution: int, device: torch.device, batches: list[int], repeats: int) -> dict:  # type: ignore[type-arg]
    model = random_model(arch, 0).to(device).eval()
    global_graph, local_graph = (
        GlobalGraph(model, (resolution, resolution)).to(device).eval(),
        LocalGraph(model),
    )
    images = torch.from_numpy(reference_images((resolution, resolution), max(batches))).to(device)

    def forward(x: torch.Tensor, half: bool) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=half):
            d, f, c = global_graph(x)
            return (d, f, c, *local_graph(f, c))

    out: dict[str, object] = {"arch": arch, "resolution": resolution, "latency_ms": {}}
    for batch in batches:
        x = images[:batch]
        for name, half in (("fp32", False), ("fp16_autocast", True)):
            ms = timed(lambda x=x, half=half: forward(x, half), device, repeats)
            out["latency_ms"][f"{name}_batch{batch}"] = ms  # type: ignore[index]
            label = f"{arch}/{resolution} {name:14s} batch {batch:2d}"
            print(f"{label}: {ms:8.2f} ms ({ms / batch:.2f} ms/img)", flush=True)
    ref = [t.float().cpu().numpy() for t in forward(images, False)]
    half = [t.float().cpu().numpy() for t in forward(images, True)]
    reference = {
        "global": ref[0],
        "confidence": ref[2],
        "tokens": ref[3],
        "count": ref[4].astype(np.int64),
        "region_mask": ref[5] > 0.5,
    }
    candidate = EncoderOutput(
        GlobalOutput(half[0], half[1], half[2]),
        LocalOutput(half[3], half[4].astype(np.int64), half[5] > 0.5),
    )
    parity = compare(reference, candidate, "fp16").to_dict()
    out["fp16_autocast_vs_fp32"] = parity
    print(f"fp16 autocast vs fp32: {parity}", flush=True)
    return out


def options() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("--arch", default="vitb14")
    p.add_argument("--resolution", type=int, default=322)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, 2 repeats")
    return p


def main() -> None:
    args = options().parse_args()
    if args.dry_run:
        args.batches, args.repeats, args.resolution = [1, 2], 2, 224
    device = torch.device(args.device)
    result = run(args.arch, args.resolution, device, args.batches, args.repeats)
    result["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result["weights"] = "UNTRAINED seeded random"
    write_report(args.json, result)


if __name__ == "__main__":
    main()
