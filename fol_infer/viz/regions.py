"""`show regions`: the image with the 225 regions the local branch keeps, by confidence."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fol_infer.viz.figure import new_figure, save, untrained_caption
from fol_infer.viz.tokens import EncodedImage, region_boxes


@dataclass(frozen=True)
class RegionFigure:
    """What the figure plots: one box per kept region, most confident first."""

    image: EncodedImage
    boxes: np.ndarray  # (225, 4) x0, y0, x1, y1 in original pixels
    confidence: np.ndarray  # (225,)
    grid: tuple[int, int]  # (h, w) patches the regions were chosen from

    @property
    def relative_confidence(self) -> np.ndarray:
        """Confidence x h*w: 1 is a uniform map (the softmax is nearly flat; spec section 5)."""
        return self.confidence * (self.grid[0] * self.grid[1])


def region_figure(image: EncodedImage) -> RegionFigure:
    boxes, confidence = region_boxes(image)
    h, w = image.region_mask.shape
    return RegionFigure(image, boxes, confidence, (h, w))


def draw_regions(data: RegionFigure, out: Path, trained: bool) -> None:
    height, width = data.image.pixels.shape[:2]
    figure = new_figure(figsize=(8, 6.6 * height / width + 0.9))
    from matplotlib import cm, colormaps, colors, ticker
    from matplotlib.patches import Rectangle

    axes = figure.add_subplot()
    axes.imshow(data.image.pixels)
    relative = data.relative_confidence
    norm = colors.Normalize(float(relative.min()), float(relative.max()))
    cmap = colormaps["plasma"]
    for (x0, y0, x1, y1), c in zip(data.boxes[::-1], relative[::-1]):  # best on top
        colour = cmap(norm(float(c)))
        axes.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=True, alpha=0.18, color=colour))
        axes.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=0.8, ec=colour))
    axes.set_axis_off()
    h, w = data.grid
    axes.set_title(
        f"{Path(data.image.source).name}: the {len(data.boxes)} regions the local branch keeps "
        f"(of {h} x {w} patches)",
        fontsize=10,
    )
    bar = figure.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.8)
    bar.formatter = ticker.ScalarFormatter(useOffset=False)
    bar.update_ticks()
    bar.set_label("region confidence x h*w (1 = uniform)")
    untrained_caption(figure, trained)
    save(figure, out)
