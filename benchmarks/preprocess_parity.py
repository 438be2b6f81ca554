"""Pre-processing parity and speed: fol_infer.images against the torch pipeline, same run.

For every JPEG under ../shared/data and each model resolution, prints the largest |difference|
between ``preprocess`` and the published torch order (to_tensor -> normalise at full size ->
``F.interpolate(bilinear, align_corners=False, antialias=False)``), and milliseconds per image
for both, end to end (decode included, Pillow in both) and from an already decoded array.

    python benchmarks/preprocess_parity.py [--repeat 7] [--pass-order] [--json PATH]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import parser, write_report
from PIL import Image

from fol_infer import images

ROOT = Path(__file__).resolve().parents[1]
SIZES = ((322, 322), (504, 504))
COLUMNS = ("max_abs_diff", "ours_e2e_ms", "torch_e2e_ms", "ours_array_ms", "torch_array_ms")
MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def decode(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def torch_from_array(rgb: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div(255)
    x = (x - MEAN) / STD
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=False)[
        0
    ]


def torch_from_file(path: Path, size: tuple[int, int]) -> torch.Tensor:
    return torch_from_array(decode(path), size)


def best_ms(fns: list[Callable[[], object]], repeat: int) -> list[float]:
    """Best-of-``repeat`` milliseconds of each function, run in turn so load hits all alike."""
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return [t * 1e3 for t in best]


def parity(paths: list[Path], repeat: int) -> dict[str, object]:
    """Print and return, per JPEG and size and on average per size: max|diff| and the ms of
    ours and of torch, end to end and from the decoded array."""
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}, "
        f"{len(paths)} JPEGs, best of {repeat} runs; ratio = torch ms / ours ms"
    )
    head = (
        f"{'image':<22}{'W x H':>11}{'size':>9}{'max|diff|':>11}"
        f"{'ours e2e':>10}{'torch e2e':>10}{'ratio':>7}"
        f"{'ours arr':>10}{'torch arr':>10}{'ratio':>7}"
    )
    print(head)
    totals: dict[tuple[int, int], list[np.ndarray]] = {size: [] for size in SIZES}
    rows = []
    for path in paths:
        rgb = decode(path)
        for size in SIZES:
            diff = np.abs(images.preprocess(path, size) - torch_from_array(rgb, size).numpy()).max()
            fns: list[Callable[[], object]] = [
                partial(images.preprocess, path, size),
                partial(torch_from_file, path, size),
                partial(images.preprocess, rgb, size),
                partial(torch_from_array, rgb, size),
            ]
            row = np.array([diff, *best_ms(fns, repeat)])
            totals[size].append(row)
            name = f"{path.parent.name}/{path.name}"
            rows.append({"image": name, "size": size[0]} | dict(zip(COLUMNS, row.tolist())))
            print(
                f"{name:<22}{f'{rgb.shape[1]}x{rgb.shape[0]}':>11}{size[0]:>9}{row[0]:>11.2e}"
                f"{row[1]:>10.2f}{row[2]:>10.2f}{row[2] / row[1]:>7.2f}"
                f"{row[3]:>10.2f}{row[4]:>10.2f}{row[4] / row[3]:>7.2f}"
            )
    print("\nsummary (mean ms per image over all JPEGs)")
    print(
        f"{'size':>9}{'max|diff|':>11}{'ours e2e':>10}{'torch e2e':>10}{'ratio':>7}"
        f"{'ours arr':>10}{'torch arr':>10}{'ratio':>7}"
    )
    summary = []
    for size, per_image in totals.items():
        worst = max(r[0] for r in per_image)
        mean = np.mean(per_image, axis=0)
        summary.append({"size": size[0]} | dict(zip(COLUMNS, [worst, *mean[1:].tolist()])))
        print(
            f"{f'{size[0]}x{size[1]}':>9}{worst:>11.2e}{mean[1]:>10.2f}{mean[2]:>10.2f}"
            f"{mean[2] / mean[1]:>7.2f}{mean[3]:>10.2f}{mean[4]:>10.2f}{mean[4] / mean[3]:>7.2f}"
        )
    return {"images": rows, "mean_per_size": summary}


def resize_in_order(raw: np.ndarray, size: tuple[int, int], rows_first: bool) -> np.ndarray:
    """``images._resize`` with its pass order forced, to check the cost model's pick."""
    pick = images._rows_first
    images._rows_first = lambda *_: rows_first
    try:
        return images._resize(raw, size)
    finally:
        images._rows_first = pick


def pass_order(paths: list[Path], repeat: int) -> list[dict[str, object]]:
    """Time both orders of the two resize passes; checks the cost model in ``images._resize``."""
    print("\nresize pass order (uint8 input, ms): rows first vs columns first, and the pick")
    shapes = sorted({decode(p).shape for p in paths})
    extremes = [
        ((480, 480, 3), (1000, 1000)),
        ((100, 3000, 3), (504, 504)),
        ((3000, 100, 3), (504, 504)),
    ]
    cases = [(s, size) for s in shapes for size in SIZES] + extremes
    timed = []
    for shape, (h, w) in cases:
        raw = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        rows_ms, cols_ms = best_ms(
            [
                partial(resize_in_order, raw, (h, w), True),
                partial(resize_in_order, raw, (h, w), False),
            ],
            repeat,
        )
        pick = "rows" if images._rows_first(shape[0], shape[1], h, w) else "cols"
        case = f"{shape[1]}x{shape[0]} -> {w}x{h}"
        print(f"{case:<22} rows {rows_ms:7.2f}  cols {cols_ms:7.2f}  pick {pick}")
        timed.append(
            {"case": case, "rows_first_ms": rows_ms, "cols_first_ms": cols_ms, "pick": pick}
        )
    return timed


def options() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--pass-order", action="store_true", help="also time both pass orders")
    return p


def main() -> None:
    args = options().parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    paths = sorted(args.data.rglob("*.jpg"))
    if not paths:
        raise SystemExit(f"no JPEGs under {args.data}")
    report: dict[str, object] = {"torch_threads": torch.get_num_threads(), "repeat": args.repeat}
    report |= parity(paths, args.repeat)
    if args.pass_order:
        report["pass_order"] = pass_order(paths, args.repeat)
    write_report(args.json, report)


if __name__ == "__main__":
    main()
