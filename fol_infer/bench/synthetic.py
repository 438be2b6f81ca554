"""A small synthetic dataset in the standard VPR layout (`fol_infer.bench.dataset`), drawn
deterministically, so the whole benchmark can run where no real dataset is at hand. It
exercises the pipeline; it says nothing about FoL's accuracy (its README says so, and
`Dataset.synthetic` lets reports say so too).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fol_infer.errors import UsageError
from fol_infer.files.atomic import new_sibling_folder, replace_folder
from fol_infer.progress import Advance

GENERATOR_VERSION = 1
SYNTHETIC_HEADER = "fol-infer synthetic dataset"
_README = "README.txt"
_ORIGIN = (550_000.0, 4_180_000.0)  # metres; any UTM zone would do
_SPACING_M = 300.0  # grid of sites; with the jitter below, sites stay >= 260 m apart
_SITE_JITTER_M = 20.0
_VIEW_JITTER_M = 3.0  # per axis: two views of one place are <= 2 * 3 * sqrt(2) = 8.5 m apart
_CANVAS = 1.3  # scene size / view size: room for the shifts, zooms and rotations below
_MIN_SIDE = 32


@dataclass(frozen=True)
class _View:
    scene: int  # places first, then distractors
    index: int  # per scene: database views, then queries
    query: bool
    name: str  # relative to images/test


@dataclass(frozen=True)
class SyntheticPlan:
    """Every image of a synthetic dataset, named and placed, before any pixel is drawn.

    Planning first lets a caller size a progress bar (`len(plan.views)`) before `write`.
    """

    places: int
    queries_per_place: int
    distractors: int
    seed: int
    size: tuple[int, int]  # (height, width)
    views: tuple[_View, ...]

    def write(self, out: Path | str, force: bool = False, progress: Advance | None = None) -> Path:
        """Draw into a temporary folder beside `out`, then rename it to `out`.

        An existing `out` is replaced only with `force`, and only when it is empty or is a
        synthetic dataset itself: `--force` must never delete someone's real data.
        """
        out = Path(out)
        if out.exists() or out.is_symlink():
            if not force:
                raise UsageError(f"{out} already exists: pass --force to replace it")
            if not (out.is_dir() and (is_synthetic(out) or not any(out.iterdir()))):
                raise UsageError(
                    f"{out} is not an empty folder or a synthetic dataset: refusing to replace "
                    "it; remove it yourself or choose another output folder"
                )
        tmp = None
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = new_sibling_folder(out)
            self._draw(tmp, progress)
            (tmp / _README).write_text(self._readme(), encoding="utf-8")
            replace_folder(tmp, out)
        except OSError as exc:
            raise UsageError(f"cannot write the dataset to {out}: {exc.strerror or exc}") from exc
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        return out

    def _draw(self, tmp: Path, progress: Advance | None) -> None:
        h, w = self.size
        for folder in ("database", "queries"):
            (tmp / "images" / "test" / folder).mkdir(parents=True)
        scene, canvas = -1, None
        for view in self.views:  # grouped by scene: each scene is drawn once
            if view.scene != scene:
                scene = view.scene
                canvas = _draw_scene(_rng(self.seed, 1, scene), h, w)
            assert canvas is not None
            rng = _rng(self.seed, 2, view.scene, view.index)
            view_image = _draw_view(canvas, rng, h, w, view.query)
            # Fixed encoder settings: same pixels -> same bytes.
            view_image.save(tmp / "images" / "test" / view.name, "JPEG", quality=90, subsampling=2)
            if progress is not None:
                progress(1)

    def _readme(self) -> str:
        n_db = sum(not v.query for v in self.views)
        h, w = self.size
        return (
            f"{SYNTHETIC_HEADER}\n"
            f"generator version: {GENERATOR_VERSION}\n"
            f"seed: {self.seed}\n"
            f"places: {self.places}, queries per place: {self.queries_per_place}, "
            f"distractors: {self.distractors}, image size: {h}x{w} (height x width)\n"
            f"database images: {n_db}, query images: {len(self.views) - n_db}\n\n"
            "Procedurally drawn scenes written by `fol-infer make-dataset`. Queries are changed\n"
            "views of their place (crop, scale, small rotation, brightness and colour shifts,\n"
            "occluding blobs). File names carry UTM coordinates (@east@north@...): views of one\n"
            "place lie within 25 m of each other, places at least 200 m apart, distractor\n"
            "database images far from every query.\n\n"
            "This dataset exercises the pipeline; it says nothing about FoL's accuracy.\n"
        )


def plan_dataset(
    places: int = 20,
    queries_per_place: int = 2,
    distractors: int | None = None,
    seed: int = 0,
    size: tuple[int, int] = (480, 640),
) -> SyntheticPlan:
    """Name and place every image; `distractors` defaults to `places`. Same arguments, same plan."""
    distractors = places if distractors is None else distractors
    h, w = (int(v) for v in size)
    if places < 1 or queries_per_place < 1 or distractors < 0:
        raise UsageError("need at least 1 place and 1 query per place, and 0 or more distractors")
    if seed < 0:
        raise UsageError(f"seed {seed}: use an integer >= 0")
    if min(h, w) < _MIN_SIDE:
        raise UsageError(f"image size {h}x{w}: each side must be at least {_MIN_SIDE} pixels")
    rng = _rng(seed, 0)
    sites = _sites(places + distractors, rng)
    views: list[_View] = []
    for scene, site in enumerate(sites):
        if scene < places:
            n_db = int(rng.integers(1, 3))
            labels = [f"place{scene:04d}_db{j}" for j in range(n_db)]
            labels += [f"place{scene:04d}_q{j}" for j in range(queries_per_place)]
        else:
            n_db, labels = 1, [f"distractor{scene:04d}"]
        for index, label in enumerate(labels):
            east, north = site + rng.uniform(-_VIEW_JITTER_M, _VIEW_JITTER_M, 2)
            folder = "database" if index < n_db else "queries"
            name = f"{folder}/@{east:010.2f}@{north:010.2f}@10@S@{label}@.jpg"
            views.append(_View(scene, index, index >= n_db, name))
    return SyntheticPlan(places, queries_per_place, distractors, seed, (h, w), tuple(views))


def make_dataset(
    out: Path | str,
    places: int = 20,
    queries_per_place: int = 2,
    distractors: int | None = None,
    seed: int = 0,
    size: tuple[int, int] = (480, 640),
    force: bool = False,
) -> Path:
    """Write a deterministic synthetic dataset (same seed, same bytes) to `out`; see module doc."""
    return plan_dataset(places, queries_per_place, distractors, seed, size).write(out, force)


def is_synthetic(folder: Path) -> bool:
    try:
        with open(folder / _README, encoding="utf-8", errors="replace") as f:
            return f.readline().strip() == SYNTHETIC_HEADER
    except OSError:
        return False


def _rng(*key: int) -> np.random.Generator:
    """An independent stream per (seed, purpose, scene, view): drawing order cannot matter."""
    return np.random.default_rng(list(key))


def _sites(n: int, rng: np.random.Generator) -> np.ndarray:
    """n site centres on a jittered grid, in shuffled order so names do not reveal the grid."""
    cols = math.ceil(math.sqrt(n))
    cells = rng.permutation(n)
    grid = np.stack([cells % cols, cells // cols], axis=1).astype(np.float64)
    jitter = rng.uniform(-_SITE_JITTER_M, _SITE_JITTER_M, (n, 2))
    return np.array(_ORIGIN) + grid * _SPACING_M + jitter


def _colour(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    r, g, b = rng.integers(lo, hi, 3)
    return int(r), int(g), int(b)


def _draw_scene(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """A street-like scene: sky gradient, textured ground, a skyline with windows, clutter.

    Layout, colours and textures all come from `rng`, so places differ in structure, not
    only in colour, and even an untrained ViT gives each its own descriptor.
    """
    ch, cw = round(h * _CANVAS), round(w * _CANVAS)
    horizon = int(ch * rng.uniform(0.45, 0.65))
    t = np.linspace(0.0, 1.0, ch, dtype=np.float32)[:, None]
    rows = rng.uniform(60, 255, 3).astype(np.float32) * (1 - t) + rng.uniform(60, 255, 3) * t
    rows[horizon:] = rng.uniform(30, 200, 3)  # sky gradient above, flat ground below
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    fine = Image.fromarray(
        rng.integers(0, 256, (max(ch // 12, 2), max(cw // 12, 2), 3), dtype=np.uint8)
    )
    pixels = np.asarray(coarse.resize((cw, ch), Image.Resampling.BICUBIC), np.float32) * 0.35
    pixels += np.asarray(fine.resize((cw, ch), Image.Resampling.BILINEAR), np.float32) * 0.1
    pixels += rows[:, None, :] - 128 * 0.45
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    if rng.random() < 0.7:  # a road in perspective, with a dashed centre line
        mid = cw * rng.uniform(0.3, 0.7)
        draw.polygon(
            [
                (mid - cw * 0.05, horizon),
                (mid + cw * 0.05, horizon),
                (cw * 0.9, ch),
                (cw * 0.1, ch),
            ],
            fill=_colour(rng, 40, 120),
        )
        paint = _colour(rng, 200)
        for f in np.arange(0.0, 1.0, 0.1):
            ends = [(mid + (cw / 2 - mid) * g, horizon + (ch - horizon) * g) for g in (f, f + 0.05)]
            draw.line(ends, fill=paint, width=3)
    x = -int(rng.integers(0, cw // 10 + 1))
    while x < cw:
        bw = int(rng.integers(cw // 14, cw // 5 + 1))
        top = horizon - int(rng.integers(ch // 10, max(int(horizon * 0.9), ch // 10 + 1)))
        _building(draw, rng, x, top, x + bw, horizon)
        x += bw + int(rng.integers(0, cw // 30 + 1))
    for _ in range(int(rng.integers(4, 11))):  # poles, signs, trees, parked things
        _clutter(draw, rng, cw, ch, horizon)
    return image


def _building(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, x0: int, y0: int, x1: int, y1: int
) -> None:
    draw.rectangle([x0, y0, x1, y1], fill=_colour(rng, 20, 230), outline=_colour(rng, 0, 80))
    style = rng.random()
    if style < 0.65:  # a grid of windows
        cell_w, cell_h = int(rng.integers(8, 24)), int(rng.integers(10, 28))
        pane = _colour(rng)
        for wy in range(y0 + 6, y1 - cell_h, cell_h + 4):
            for wx in range(x0 + 4, x1 - cell_w, cell_w + 4):
                draw.rectangle([wx, wy, wx + cell_w - 4, wy + cell_h - 6], fill=pane)
    elif style < 0.9:  # horizontal bands
        band = int(rng.integers(4, 16))
        stripe = _colour(rng)
        for y in range(y0, y1, band * 2):
            draw.rectangle([x0, y, x1, min(y + band, y1)], fill=stripe)
    roof = int(rng.integers(0, 3))
    if roof == 1:
        draw.polygon([(x0, y0), (x1, y0), ((x0 + x1) // 2, y0 - (x1 - x0) // 3)], fill=_colour(rng))


def _clutter(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, cw: int, ch: int, horizon: int
) -> None:
    x = int(rng.integers(0, cw))
    y = int(rng.integers(horizon - ch // 6, ch))
    size = int(rng.integers(ch // 20, ch // 5 + 1))
    kind = int(rng.integers(0, 3))
    if kind == 0:  # a pole with a sign
        draw.rectangle([x, y - 3 * size, x + max(size // 10, 2), y], fill=_colour(rng, 0, 120))
        draw.rectangle(
            [x - size // 2, y - 3 * size, x + size // 2, y - 2 * size], fill=_colour(rng)
        )
    elif kind == 1:  # a tree-like blob
        draw.ellipse([x - size, y - 2 * size, x + size, y], fill=_colour(rng, 0, 160))
    else:  # a box
        draw.rectangle([x - size, y - size // 2, x + size, y], fill=_colour(rng), outline=(0, 0, 0))


def _draw_view(
    canvas: Image.Image, rng: np.random.Generator, h: int, w: int, query: bool
) -> Image.Image:
    """One camera view of a scene; queries change more: zoom, turn, light, colour, occluders.

    The extreme query (zoom 1.05, 5 degrees, 4 % shift) still samples inside the 1.3x canvas
    for aspect ratios between 1:2 and 2:1.
    """
    if query:
        scale, degrees, shift = (
            rng.uniform(0.8, 1.05),
            rng.uniform(-5, 5),
            rng.uniform(-0.04, 0.04, 2),
        )
    else:
        scale, degrees, shift = (
            rng.uniform(0.97, 1.03),
            rng.uniform(-1, 1),
            rng.uniform(-0.02, 0.02, 2),
        )
    cos, sin = math.cos(math.radians(degrees)) * scale, math.sin(math.radians(degrees)) * scale
    cx, cy = canvas.width / 2 + shift[0] * w, canvas.height / 2 + shift[1] * h
    # Output pixel (x, y) samples the canvas at centre + scaled rotation of (x, y) - view centre.
    affine = (cos, -sin, cx - cos * w / 2 + sin * h / 2, sin, cos, cy - sin * w / 2 - cos * h / 2)
    view = canvas.transform(
        (w, h),
        Image.Transform.AFFINE,
        affine,
        resample=Image.Resampling.BILINEAR,
        fillcolor=(127, 127, 127),
    )
    if query:
        gain = rng.uniform(0.7, 1.3) * rng.uniform(0.88, 1.12, 3)
        offset = rng.uniform(-15, 15, 3)
    else:
        gain, offset = np.full(3, rng.uniform(0.95, 1.05)), np.zeros(3)
    levels = np.arange(256.0)[None, :] * gain[:, None] + offset[:, None]
    view = view.point(np.clip(levels + 0.5, 0, 255).astype(np.uint8).ravel().tolist())
    if query:
        draw = ImageDraw.Draw(view)
        for _ in range(int(rng.integers(1, 4))):
            rx, ry = (rng.uniform(0.04, 0.12) * w for _ in range(2))
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=_colour(rng))
    return view
