"""The one door to matplotlib: a figure without pyplot (no GUI, thread-safe), saved by suffix."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fol_infer.errors import UsageError
from fol_infer.files.atomic import Writer, write_outputs

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FORMATS = (".png", ".svg")
GREEN, RED, GREY = "#2ca02c", "#d62728", "#7f7f7f"
UNTRAINED_NOTE = "UNTRAINED weights: the picture shows the pipeline, not FoL's accuracy"


def check_out(path: Path) -> Path:
    """Refuse an output suffix other than .png or .svg, or a missing matplotlib, before any
    work is done."""
    if path.suffix.lower() not in FORMATS:
        raise UsageError(f"--out {path}: write a .png or an .svg file (chosen by the suffix)")
    _figure_class()
    return path


def new_figure(**kwargs: Any) -> Figure:
    """A matplotlib Figure (no pyplot, no GUI), laid out to fit its contents."""
    return _figure_class()(layout="constrained", **kwargs)


def _figure_class() -> type[Figure]:
    """matplotlib's Figure, or a clear error naming the extra that installs it."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError(
            "figures need matplotlib, which is not installed: pip install 'fol-infer[viz]'"
        ) from None
    return Figure


def writer(figure: Figure, path: Path) -> Writer:
    """What writes ``figure`` as PNG or SVG, by ``path``'s suffix, into an open file: for
    `fol_infer.files.atomic.write_outputs`, beside a command's other outputs."""
    check_out(path)
    fmt = path.suffix.lower()[1:]
    return lambda f: figure.savefig(f, format=fmt, dpi=110, bbox_inches="tight")


def save(figure: Figure, path: Path) -> None:
    """Write ``figure`` to ``path`` atomically: a failed write keeps any old file."""
    write_outputs({path: writer(figure, path)})


def untrained_caption(figure: Figure, trained: bool) -> None:
    """Under the figure, in red, whenever the weights are a seeded random checkpoint."""
    if not trained:
        figure.supxlabel(UNTRAINED_NOTE, color=RED, fontsize=9)
