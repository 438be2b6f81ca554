"""Token store: bytes per image against the published layout, and what fp16, int8 and
int8-exact do to rankings.

Part 1 (size). Stores of images with FoL's true token counts (225 selected patches of the
h x h grid, each covering 9, 12 or 16 positions of the upsampled grid, spec section 6) in fp32,
fp16 and int8; bytes on disk per image as a ratio to the published 3600 x 128 float32
(1.76 MiB). int8-exact keeps both the int8 and the float32 store.

Part 2 (re-ranking fidelity). Synthetic queries, each with K candidates; every candidate's
tokens go through real stores (fp32, fp16, int8) and come back through `get`; each store's
tokens are scored against the fp32 query (spec section 7: mutual nearest neighbours with
similarity > 0.7), candidates re-sorted by score (ties by global rank) and the orders compared.
int8-exact is the certified re-ranker (`fol_infer.rerank.certified`) on the int8 store, reading
the float32 store's rows only where its error bound leaves a decision open; the script counts
those rows and the 4 KiB pages they touch.

The generator, "model-like" tokens:
- a visual vocabulary of 2,000 random unit "words"; an image picks `--patches` grid cells of a
  23 x 23 grid (their 9/12/16-position coverage gives the token count) and one word per cell,
  perturbed per image (BETA), so unrelated images share look-alike regions and negatives score
  a few matches, as real ones do;
- each token is its cell's vector plus a per-token perturbation (ALPHA): tokens of one cell
  are near-duplicates (cosine ~0.8), like the upsampled local features, which makes argmax
  near-ties common - the hard case for quantisation;
- a planted share (`--positive-share`) of the candidates are true matches: a fraction
  f ~ U(0.05, 0.6) of their tokens are the query's tokens plus noise of norm sigma ~ U(0.3,
  1.3) (cosine ~ 1/sqrt(1 + sigma^2), i.e. 0.96 ... 0.61 around the 0.7 threshold), so scores
  spread from a few to several hundred.
The default `--patches 48` (~700 tokens per image, a fifth of the real ~3,400) keeps the run
within minutes on 2 CPU cores; `--patches 225` gives the real counts.

Scores come from `fol_infer.rerank.count_mutual_matches` when it is importable, else (or with
`--scorer local`) from a float32 numpy reference of spec section 7 in this file.

Run: python benchmarks/token_store.py [--queries 200 --k 100 --patches 48] [--json PATH]
(the tables are printed as Markdown; `--json` saves the same figures)
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from common import parser, settings, write_report

from fol_infer.index.token_store import TokenStore
from fol_infer.rerank import count_mutual_matches_certified

PUBLISHED_BYTES = 3600 * 128 * 4  # 1.76 MiB: the published zero-padded float32 layout
DIM, GRID, VOCAB_SIZE = 128, 23, 2000
ALPHA, BETA = 0.45, 0.55
THRESHOLD = 0.7
DTYPES = ("fp32", "fp16", "int8")

Scorer = Callable[[np.ndarray, Sequence[np.ndarray]], np.ndarray]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def coverage(h: int) -> np.ndarray:
    """Upsampled positions per patch of an h x h grid: nearest (floor(dst * h / H')), H' = 4h-3."""
    per_axis = np.bincount(np.arange(4 * h - 3) * h // (4 * h - 3), minlength=h)
    return np.outer(per_axis, per_axis).ravel()


def fol_counts(rng: np.random.Generator, h: int, n: int, patches: int = 225) -> list[int]:
    cov = coverage(h)
    return [int(cov[rng.choice(h * h, patches, replace=False)].sum()) for _ in range(n)]


class Generator:
    """Model-like token lists (see the module doc)."""

    def __init__(self, rng: np.random.Generator, patches: int):
        self.rng, self.patches = rng, patches
        self.vocab = unit(rng.standard_normal((VOCAB_SIZE, DIM)))
        self.cov = coverage(GRID)

    def _noise(self, n: int, norm: float | np.ndarray) -> np.ndarray:
        return unit(self.rng.standard_normal((n, DIM))) * np.reshape(norm, (-1, 1))

    def image(self) -> np.ndarray:
        cells = self.rng.choice(GRID * GRID, self.patches, replace=False)
        words = self.vocab[self.rng.integers(0, VOCAB_SIZE, self.patches)]
        base = np.repeat(unit(words + self._noise(self.patches, BETA)), self.cov[cells], axis=0)
        return unit(base + self._noise(len(base), ALPHA))

    def candidates(
        self, query: np.ndarray, k: int, share: float
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """K candidates and which of them are planted true matches."""
        out, planted = [], self.rng.random(k) < share
        for is_match in planted:
            r = self.image()
            if is_match:
                n = int(self.rng.uniform(0.05, 0.6) * min(len(query), len(r)))
                src = np.sort(self.rng.choice(len(query), n, replace=False))
                r[:n] = unit(query[src] + self._noise(n, self.rng.uniform(0.3, 1.3)))
            out.append(r)
        return out, planted


def local_scores(query: np.ndarray, candidates: Sequence[np.ndarray]) -> np.ndarray:
    """Spec section 7 in float32 numpy, candidates in groups of one product (S <= 256 MiB).

    i(j) (best query token per candidate token) is one argmax over the query axis of the
    group's S; j(i) is needed only for query tokens whose best similarity in that candidate
    passes the threshold (others cannot count), found from per-candidate row maxima.
    """
    q = np.asarray(query, np.float32)
    scores = np.zeros(len(candidates), np.int64)
    budget = max(1, (256 << 20) // (4 * max(1, len(q))))  # candidate rows per group
    group: list[int] = []
    for k in range(len(candidates) + 1):
        last = k == len(candidates)
        if group and (last or sum(len(candidates[g]) for g in group) + len(candidates[k]) > budget):
            _score_group(q, [np.asarray(candidates[g], np.float32) for g in group], scores, group)
            group = []
        if not last and len(candidates[k]) and len(q):
            group.append(k)
    return scores


def _score_group(q: np.ndarray, rs: list[np.ndarray], out: np.ndarray, ids: list[int]) -> None:
    starts = np.cumsum([0] + [len(r) for r in rs])
    s = q @ np.concatenate(rs).T
    best_query_token = s.argmax(axis=0)
    seg_max = np.maximum.reduceat(s, starts[:-1], axis=1)
    for col, k in enumerate(ids):
        rows = np.flatnonzero(seg_max[:, col].astype(np.float64) > THRESHOLD)
        if len(rows):
            lo, hi = starts[col], starts[col + 1]
            j = s[rows, lo:hi].argmax(axis=1) + lo
            out[k] = np.count_nonzero(best_query_token[j] == rows)


def discordant_share(a: np.ndarray, b: np.ndarray) -> float:
    """Share of candidate pairs whose relative order differs between two re-ranked orders."""
    pos_a, pos_b = np.argsort(a), np.argsort(b)
    da = np.sign(pos_a[:, None] - pos_a[None, :])
    db = np.sign(pos_b[:, None] - pos_b[None, :])
    n = len(a)
    return float(np.count_nonzero(np.triu(da != db, 1))) / max(1, n * (n - 1) // 2)


def pick_scorer(choice: str) -> tuple[Scorer, str]:
    """The project's re-ranker (when it is there, unless `choice` is "local"), else the local
    reference above, which also serves to cross-check the re-ranker's figures."""
    if choice != "local":
        try:
            from fol_infer.rerank import count_mutual_matches
        except ImportError:
            if choice == "rerank":
                raise
        else:

            def scorer(query: np.ndarray, candidates: Sequence[np.ndarray]) -> np.ndarray:
                return np.asarray(count_mutual_matches(query, list(candidates)), np.int64)

            return scorer, "fol_infer.rerank.count_mutual_matches"
    return local_scores, "local float32 numpy reference (benchmarks/token_store.py)"


def rerank_order(scores: np.ndarray) -> np.ndarray:
    """Candidates by score, descending; ties keep the global rank (stable)."""
    return np.argsort(-scores, kind="stable")


def sizes(rng: np.random.Generator, tmp: Path, n_images: int) -> list[dict[str, object]]:
    print(
        f"## bytes per image vs the published {PUBLISHED_BYTES / 2**20:.2f} MiB, {n_images} images"
    )
    print("| input | dtype | mean tokens | bytes/image on disk | ratio to published |")
    print("|---|---|---|---|---|")
    rows: list[dict[str, object]] = []
    for h, label in ((23, "322x322"), (36, "504x504")):
        counts = fol_counts(rng, h, n_images)
        tokens = [unit(rng.standard_normal((c, DIM))) for c in counts]
        bpi: dict[str, float] = {}
        for dtype in DTYPES:
            with TokenStore.create(tmp / f"{label}-{dtype}", dtype=dtype) as store:  # type: ignore[arg-type]
                store.append(tokens)
                bpi[dtype] = store.bytes_per_image
        # int8-exact: the int8 store is read whole per query, the float32 one row by row
        bpi["int8-exact (int8 + fp32 on disk)"] = bpi["int8"] + bpi["fp32"]
        for fmt, size in bpi.items():
            print(
                f"| {label} | {fmt} | {np.mean(counts):.0f} | {size:,.0f} | "
                f"{size / PUBLISHED_BYTES:.4f} |"
            )
            rows.append(
                {"input": label, "format": fmt, "mean_tokens": float(np.mean(counts))}
                | {"bytes_per_image": size, "ratio_to_published": size / PUBLISHED_BYTES}
            )
    return rows


def certified_scorer(
    query: np.ndarray, int8: TokenStore, fp32: TokenStore, ids: range
) -> tuple[np.ndarray, int, int]:
    """Scores from the int8 store plus the float32 rows the certified re-ranker asks for;
    also the 4 KiB pages of the float32 store those rows touch."""
    pages: set[int] = set()
    ends = np.concatenate([[0], np.cumsum(fp32.counts)])
    row_bytes = fp32.dim * 4

    def originals(_q: int, k: int, rows: np.ndarray) -> np.ndarray:
        pages.update(((ends[ids[k]] + rows) * row_bytes // 4096).tolist())
        return fp32.get_rows(ids[k], rows)

    (out,) = count_mutual_matches_certified([query], [int8.get_quantized(ids)], originals)
    return out.scores, out.exact_rows, len(pages)


def fp32_pages(fp32: TokenStore, ids: range) -> int:
    """4 KiB pages a plain float32 re-ranking of these candidates reads."""
    ends = np.concatenate([[0], np.cumsum(fp32.counts)]) * fp32.dim * 4
    return sum(
        int((ends[i + 1] - 1) // 4096 - ends[i] // 4096 + 1) for i in ids if ends[i + 1] > ends[i]
    )


def fidelity(args: argparse.Namespace, rng: np.random.Generator, tmp: Path) -> dict[str, object]:
    scorer, scorer_name = pick_scorer(args.scorer)
    gen = Generator(rng, args.patches)
    formats = ("fp16", "int8", "int8-exact")
    same = dict.fromkeys(formats, 0)
    top1 = dict.fromkeys(formats, 0)
    top10 = dict.fromkeys(formats, 0)
    discordant = dict.fromkeys(formats, 0.0)
    same_score = dict.fromkeys(formats, 0)
    max_diff = dict.fromkeys(formats, 0)
    n_tokens, pos_scores, neg_scores = [], [], []
    t_score = dict.fromkeys(("fp32", *formats), 0.0)
    exact_rows = exact_pages = all_pages = 0
    t0 = time.perf_counter()
    for qi in range(args.queries):
        query = gen.image()
        cands, planted = gen.candidates(query, args.k, args.positive_share)
        n_tokens += [len(c) for c in cands]
        orders, scores = {}, {}
        stores = {d: TokenStore.create(tmp / f"q{qi}-{d}", dtype=d) for d in DTYPES}  # type: ignore[arg-type]
        try:
            for dtype, store in stores.items():
                ids = store.append(cands)
                back = store.get(ids)
                t = time.perf_counter()
                scores[dtype] = scorer(query, back)
                t_score[dtype] += time.perf_counter() - t
            t = time.perf_counter()
            scores["int8-exact"], rows, pages = certified_scorer(
                query, stores["int8"], stores["fp32"], ids
            )
            t_score["int8-exact"] += time.perf_counter() - t
            exact_rows += rows
            exact_pages += pages
            all_pages += fp32_pages(stores["fp32"], ids)
        finally:
            for store in stores.values():
                store.close()
        orders = {fmt: rerank_order(sc) for fmt, sc in scores.items()}
        for fmt in formats:
            same[fmt] += bool(np.array_equal(orders[fmt], orders["fp32"]))
            top1[fmt] += bool(orders[fmt][0] == orders["fp32"][0])
            top10[fmt] += bool(np.array_equal(orders[fmt][:10], orders["fp32"][:10]))
            discordant[fmt] += discordant_share(orders[fmt], orders["fp32"]) / args.queries
            same_score[fmt] += int(np.count_nonzero(scores[fmt] == scores["fp32"]))
            max_diff[fmt] = max(max_diff[fmt], int(np.abs(scores[fmt] - scores["fp32"]).max()))
        pos_scores += scores["fp32"][planted].tolist()
        neg_scores += scores["fp32"][~planted].tolist()
        for dtype in DTYPES:
            shutil.rmtree(tmp / f"q{qi}-{dtype}")
    wall = time.perf_counter() - t0
    nq, pairs = args.queries, args.queries * args.k
    print(f"\n## re-ranking fidelity: {nq} queries x K={args.k} candidates, scorer: {scorer_name}")
    print(
        f"tokens per image: mean {np.mean(n_tokens):.0f} "
        f"(min {min(n_tokens)}, max {max(n_tokens)}); "
        f"fp32 scores: planted matches median {np.median(pos_scores):.0f} "
        f"(max {max(pos_scores)}), other candidates median {np.median(neg_scores):.0f} "
        f"(max {max(neg_scores)}); wall {wall:.0f} s"
    )
    print(
        "| tokens | identical re-ranked order | same top-1 | identical top-10 order "
        "| candidate pairs swapped | candidates with the fp32 score | max score change "
        "| scoring time vs fp32 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    figures: dict[str, dict[str, float]] = {}
    for fmt in formats:
        figures[fmt] = {
            "identical_order": same[fmt] / nq,
            "same_top1": top1[fmt] / nq,
            "identical_top10_order": top10[fmt] / nq,
            "pairs_swapped": discordant[fmt],
            "same_score": same_score[fmt] / pairs,
            "max_score_change": max_diff[fmt],
            "scoring_time_vs_fp32": t_score[fmt] / t_score["fp32"],
        }
        print(
            f"| {fmt} | {same[fmt] / nq:.2%} ({same[fmt]}/{nq}) | {top1[fmt] / nq:.2%} | "
            f"{top10[fmt] / nq:.2%} | {discordant[fmt]:.4%} | "
            f"{same_score[fmt] / pairs:.2%} | {max_diff[fmt]} | "
            f"{t_score[fmt] / t_score['fp32']:.2f} |"
        )
    print(
        f"\nint8-exact read the whole int8 copy of every candidate plus {exact_rows:,} float32 "
        f"rows, {exact_rows / sum(n_tokens):.2%} of all candidate rows, on {exact_pages:,} "
        f"4 KiB pages: {exact_pages / all_pages:.2%} of the pages a float32 re-ranking reads."
    )
    figures["int8-exact"] |= {
        "float32_rows_read": exact_rows,
        "float32_rows_read_share": exact_rows / sum(n_tokens),
        "float32_pages_read_share": exact_pages / all_pages,
    }
    return {
        "scorer": scorer_name,
        "mean_tokens": float(np.mean(n_tokens)),
        "wall_s": wall,
    } | figures


def options() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--patches", type=int, default=48, help="selected patches per image (FoL: 225)")
    p.add_argument("--positive-share", type=float, default=0.3)
    p.add_argument("--size-images", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tmp",
        default="/dev/shm" if Path("/dev/shm").is_dir() else None,
        help="folder for the per-query stores of part 2 (RAM by default: fsync is not measured)",
    )
    p.add_argument("--scorer", choices=["auto", "rerank", "local"], default="auto")
    p.add_argument("--skip-size", action="store_true")
    p.add_argument("--skip-fidelity", action="store_true")
    return p


def main() -> None:
    args = options().parse_args()
    report: dict[str, object] = {"settings": settings(args)}
    # One generator per part, so that either part reproduces alone.
    if not args.skip_size:
        with tempfile.TemporaryDirectory(prefix="fol-token-bench-") as tmp:
            rng = np.random.default_rng([args.seed, 1])
            report["sizes"] = sizes(rng, Path(tmp), args.size_images)
    if not args.skip_fidelity:
        with tempfile.TemporaryDirectory(prefix="fol-token-bench-", dir=args.tmp) as tmp:
            report["fidelity"] = fidelity(args, np.random.default_rng(args.seed), Path(tmp))
    write_report(args.json, report)


if __name__ == "__main__":
    main()
