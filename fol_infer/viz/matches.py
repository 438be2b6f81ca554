"""`show matches`: two images side by side, the token pairs re-ranking counts drawn as lines.

The pairs come from `fol_infer.rerank.cpu.mutual_pairs` and the count in the title from the
re-ranker itself (`count_mutual_matches`), which must agree: the figure shows exactly what
the score counts. Lines are subsampled evenly over the pairs (in query token order, so they
spread over the image) to stay readable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fol_infer.errors import UsageError
from fol_infer.rerank import RerankSettings, score_many
from fol_infer.rerank.cpu import mutual_pairs
from fol_infer.viz.figure import GREEN, new_figure, save, untrained_caption
from fol_infer.viz.tokens import EncodedImage, token_xy

MAX_LINES = 80


@dataclass(frozen=True)
class MatchFigure:
    """What the figure plots. ``pairs`` index the two token lists; ``shown`` indexes ``pairs``."""

    query: EncodedImage
    candidate: EncodedImage
    query_xy: np.ndarray  # (Nq, 2) x, y of every query token in original pixels
    candidate_xy: np.ndarray  # (Nr, 2)
    pairs: np.ndarray  # (M, 2) int64 (query token, candidate token)
    similarity: np.ndarray  # (M,)
    count: int  # the re-ranker's score for this pair of images: M
    threshold: float
    shown: np.ndarray  # indices of the pairs drawn


def match_figure(
    query: EncodedImage,
    candidate: EncodedImage,
    settings: RerankSettings,
    max_lines: int = MAX_LINES,
) -> MatchFigure:
    """The pairs re-ranking under ``settings`` counts between two images of one bundle."""
    if query.resolution != candidate.resolution:
        (qh, qw), (ch, cw) = query.resolution, candidate.resolution
        raise UsageError(
            f"{query.source} was encoded at {qh}x{qw} and {candidate.source} at {ch}x{cw}: "
            "tokens of different resolutions cannot be matched; encode both with one bundle"
        )
    if query.bundle != candidate.bundle:
        raise UsageError(
            f"{query.source} and {candidate.source} were encoded by different bundles "
            f"(fingerprints {query.bundle[:12]} and {candidate.bundle[:12]}): their tokens "
            "cannot be matched; encode both with one bundle"
        )
    pairs, similarity = mutual_pairs(query.tokens, candidate.tokens, settings)
    count = int(score_many([query.tokens], [[candidate.tokens]], settings)[0][0])
    if count != len(pairs):
        raise RuntimeError(f"the re-ranker counts {count} pairs but {len(pairs)} were found")
    shown = np.unique(np.linspace(0, len(pairs) - 1, min(max_lines, len(pairs))).round())
    return MatchFigure(
        query,
        candidate,
        token_xy(query),
        token_xy(candidate),
        pairs,
        similarity,
        count,
        settings.threshold,
        shown.astype(np.int64),
    )


def draw_matches(data: MatchFigure, out: Path, trained: bool) -> None:
    images = (data.query, data.candidate)
    aspect = max(im.pixels.shape[0] / im.pixels.shape[1] for im in images)
    figure = new_figure(figsize=(14, 6.6 * aspect + 1.4))
    from matplotlib import cm, colormaps, colors
    from matplotlib.patches import ConnectionPatch

    axes = figure.subplots(1, 2)
    for ax, image, xy in zip(axes, images, (data.query_xy, data.candidate_xy)):
        ax.imshow(image.pixels)
        ax.scatter(xy[:, 0], xy[:, 1], s=0.4, c="white", alpha=0.35, linewidths=0)
        ax.set_title(Path(image.source).name, fontsize=10)
        ax.set_axis_off()
    norm = colors.Normalize(data.threshold, 1.0)
    cmap = colormaps["viridis"]
    for k in data.shown:
        i, j = data.pairs[k]
        line = ConnectionPatch(
            xyA=tuple(data.query_xy[i]),
            coordsA="data",
            axesA=axes[0],
            xyB=tuple(data.candidate_xy[j]),
            coordsB="data",
            axesB=axes[1],
            color=cmap(norm(float(data.similarity[k]))),
            lw=0.9,
            alpha=0.85,
        )
        figure.add_artist(line)
    for ax, xy, side in ((axes[0], data.query_xy, 0), (axes[1], data.candidate_xy, 1)):
        ends = xy[data.pairs[data.shown, side]] if len(data.shown) else np.zeros((0, 2))
        ax.scatter(ends[:, 0], ends[:, 1], s=6, c=GREEN, linewidths=0)
    bar = figure.colorbar(
        cm.ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), orientation="horizontal",
        shrink=0.35, aspect=40, pad=0.02,
    )  # fmt: skip
    bar.set_label("similarity of a drawn pair")
    figure.suptitle(
        f"{data.count} mutual nearest-neighbour token matches above {data.threshold:g} "
        f"(the re-ranking score); {len(data.shown)} drawn. Tokens: "
        f"{len(data.query_xy)} and {len(data.candidate_xy)} (white dots)",
        fontsize=11,
    )
    untrained_caption(figure, trained)
    save(figure, out)
