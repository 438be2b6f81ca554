"""Re-ranked order with fp16 / int8 / int8-exact stored tokens vs fp32, on the model's own tokens.

    python benchmarks/token_formats_model.py [--bundle DIR] [--dataset ROOT] [--json PATH]

`benchmarks/token_store.py` measures the same on hand-made tokens whose similarities crowd the
0.7 threshold; this script uses the encoder's real output instead (by default the bench's
UNTRAINED ViT-B/14 at 322 and its synthetic dataset, from the bench cache). Every query
re-ranks the whole database with the CPU re-ranker; tokens go through a real TokenStore.
int8-exact is the certified re-ranker on the int8 store plus the float32 rows it asks for.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from common import parser, write_report

from fol_infer.backends import open_encoder
from fol_infer.bench import defaults
from fol_infer.bench.dataset import open_dataset
from fol_infer.bench.parity_run import encode_files
from fol_infer.bundle import Bundle
from fol_infer.images import DEFAULT_RESOLUTION
from fol_infer.index.token_store import TokenStore
from fol_infer.rerank import (
    count_mutual_matches_certified,
    count_mutual_matches_many,
    rerank_order,
)


def options() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("--bundle", type=Path)
    p.add_argument("--dataset", type=Path)
    return p


def main() -> None:
    args = options().parse_args()
    say = print
    bundle = Bundle.open(
        args.bundle
        or defaults.bundle_for(defaults.default_checkpoint(say), str(DEFAULT_RESOLUTION), say)
    )
    dataset = open_dataset(args.dataset or defaults.default_dataset(say))
    with open_encoder(bundle) as encoder:
        _, db = encode_files(encoder, dataset.database)
        _, queries = encode_files(encoder, dataset.queries)
    ids = list(range(len(db)))
    scores: dict[str, list[np.ndarray]] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("fp32", "fp16", "int8"):
            with TokenStore.create(Path(tmp) / fmt, dtype=fmt) as store:  # type: ignore[arg-type]
                store.append(db)
                stored = [t.astype(np.float32) for t in store.get(ids)]
            start = time.perf_counter()
            scores[fmt] = count_mutual_matches_many(queries, [stored] * len(queries), backend="cpu")
            seconds[fmt] = time.perf_counter() - start
        with (
            TokenStore.open(Path(tmp) / "int8") as int8,
            TokenStore.open(Path(tmp) / "fp32") as fp32,
        ):
            quantized = int8.get_quantized(ids)
            start = time.perf_counter()
            certified = count_mutual_matches_certified(
                queries, [quantized] * len(queries), lambda q, k, rows: fp32.get_rows(k, rows)
            )
            seconds["int8-exact"] = time.perf_counter() - start
        scores["int8-exact"] = [c.scores for c in certified]
        exact_share = sum(c.exact_rows for c in certified) / sum(c.rows for c in certified)
    orders = {fmt: [rerank_order(s) for s in sc] for fmt, sc in scores.items()}
    report: dict[str, object] = {
        "bundle": str(bundle.folder),
        "trained": bundle.manifest.trained,
        "queries": len(queries),
        "candidates_per_query": len(db),
        "mean_tokens": float(np.mean([len(t) for t in db])),
    }
    for fmt in ("fp16", "int8", "int8-exact"):
        same_order = np.mean([np.array_equal(a, b) for a, b in zip(orders[fmt], orders["fp32"])])
        same_top1 = np.mean([a[0] == b[0] for a, b in zip(orders[fmt], orders["fp32"])])
        same_scores = np.mean([np.mean(a == b) for a, b in zip(scores[fmt], scores["fp32"])])
        max_shift = max(int(np.abs(a - b).max()) for a, b in zip(scores[fmt], scores["fp32"]))
        report[fmt] = {
            "identical_order": float(same_order),
            "identical_top1": float(same_top1),
            "identical_scores": float(same_scores),
            "max_score_change": max_shift,
            "scoring_time_vs_fp32": seconds[fmt] / seconds["fp32"],
        }
        print(
            f"{fmt}: identical full order {same_order:.1%} of {len(queries)} queries, top-1 "
            f"{same_top1:.1%}, identical scores {same_scores:.1%}, max score change "
            f"{max_shift}, scoring time {seconds[fmt] / seconds['fp32']:.2f}x fp32"
        )
    report["int8-exact"]["float32_rows_read_share"] = exact_share  # type: ignore[index]
    print(f"int8-exact read {exact_share:.2%} of the candidates' rows in float32")
    write_report(args.json, report)


if __name__ == "__main__":
    main()
