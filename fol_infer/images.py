"""Decode images and pre-process them for the model, in numpy (no torch at run time).

The contract (spec section 2) is what the published FoL code computes in torch: RGB in [0, 1],
``F.interpolate(mode="bilinear", align_corners=False, antialias=False)`` to the model resolution,
then ImageNet normalisation. Both steps are linear, so we resize first (far fewer pixels) and
normalise after; the resize gathers two source rows and two source columns per output sample, as
PyTorch's kernel does, and converts integers to floats only for the gathered samples. EXIF
orientation is deliberately ignored: the published code does not apply it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeAlias

import numpy as np
from PIL import Image, UnidentifiedImageError

from fol_infer.errors import ImageError, UsageError
from fol_infer.model.arch import MIN_GRID, PATCH_SIZE

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
)
ImageSource: TypeAlias = str | os.PathLike[str] | Image.Image | np.ndarray

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
DEFAULT_RESOLUTION = 322  # the published input size (23 x 23 patches)
MIN_SIDE = MIN_GRID * PATCH_SIZE  # the model selects REGION_PATCHES patches: 15 x 15 at least

# Integer dtypes map to [0, 1] by their full range; 16-bit keeps its precision (no 8-bit clip).
_INT_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_COL_COST = 3
# Samples per temporary in a resize band (512 KiB of float32): the fastest of 2**14..2**18.
_BAND_SAMPLES = 1 << 17


def source_name(source: ImageSource, index: int) -> str:
    """How messages and results name an image: its path, or its position for in-memory ones."""
    return str(source) if isinstance(source, (str, os.PathLike)) else f"<image {index}>"


# ---------------------------------------------------------------- decoding


def load_rgb(source: ImageSource) -> np.ndarray:
    """Decode ``source`` into a new (H, W, 3) float32 array in [0, 1]."""
    raw = _decode(source)
    rgb = _to_unit_float(raw)
    if rgb.shape[2] == 1:
        return np.repeat(rgb, 3, axis=2)
    return rgb if rgb is not raw else rgb.copy()


def _decode(source: ImageSource) -> np.ndarray:
    """Decode to (H, W, 1 or 3) uint8, uint16 or float32 without scaling.

    Keeping integers lets ``preprocess`` convert only the samples the resize gathers; keeping
    grey images single-channel lets it resize one plane instead of three.
    """
    if isinstance(source, np.ndarray):
        return _from_array(source, "image array")
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or "PIL image"
        return _from_pil(source, name)
    if isinstance(source, (str, os.PathLike)):
        return _from_file(Path(source))
    raise ImageError(
        f"cannot read an image from a {type(source).__name__}: pass a path, a PIL image or an array"
    )


def _from_file(path: Path) -> np.ndarray:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file; check the path") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot read it ({exc.strerror})") from None
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image file")
    if size == 0:
        raise ImageError(f"{path}: empty file (0 bytes); re-copy or remove it")
    try:
        with Image.open(path) as im:
            _check_pixel_count(im, path)
            return _from_pil(im, str(path))
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (unrecognised format)") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: {exc}; downscale it first") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot read it ({exc})") from None


def _check_pixel_count(im: Image.Image, path: Path) -> None:
    """Refuse images past Pillow's bomb limit, which Pillow itself only warns about up to 2x."""
    limit = Image.MAX_IMAGE_PIXELS
    pixels = im.width * im.height
    if limit is not None and pixels > limit:
        raise ImageError(
            f"{path}: {im.width}x{im.height} ({pixels} pixels) exceeds the {limit}-pixel "
            "decompression-bomb limit; downscale it first"
        )


def _from_pil(im: Image.Image, name: str) -> np.ndarray:
    """Map every Pillow mode onto RGB or grey without losing 16-bit grey precision.

    Pillow has no 16-bit RGB mode: it hands 48-bit RGB PNGs over as 8-bit RGB, as the published
    pipeline's ``convert("RGB")`` sees them too.
    """
    try:
        im.load()  # Pillow decodes lazily: truncated or corrupt data fails here.
        mode = im.mode
        if mode in _SIXTEEN_BIT_MODES:
            return np.asarray(im).astype(np.uint16)[:, :, None]
        if mode == "I":  # 32-bit integer grey; 16-bit PNGs decode to it on older Pillows.
            return np.clip(np.asarray(im), 0, 65535).astype(np.uint16)[:, :, None]
        if mode == "F":
            return _check_unit_range(np.asarray(im, dtype=np.float32), name)[:, :, None]
        if mode in ("1", "LA"):
            im = im.convert("L")
        elif mode in ("P", "PA"):
            im = im.convert("RGBA")  # palette transparency via RGB makes Pillow warn.
        elif mode not in ("L", "RGB", "RGBA"):
            im = im.convert("RGB")  # CMYK, YCbCr, RGBa, LAB, HSV, ...
        arr = np.asarray(im)
    except ValueError as exc:  # Pillow's "conversion not supported".
        raise ImageError(f"{name}: unsupported image mode {im.mode} ({exc})") from None
    except (OSError, SyntaxError, EOFError) as exc:
        raise ImageError(f"{name}: cannot decode it, truncated or corrupt ({exc})") from None
    return arr[:, :, None] if arr.ndim == 2 else arr[:, :, :3]


def _from_array(arr: np.ndarray, name: str) -> np.ndarray:
    shape_ok = arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))
    if not shape_ok or arr.size == 0:
        raise ImageError(
            f"{name} of shape {arr.shape}: expected (H, W), (H, W, 3) or (H, W, 4) with H, W > 0"
        )
    if arr.dtype.kind == "f":
        arr = _check_unit_range(arr.astype(np.float32, copy=False), name)
    elif arr.dtype not in _INT_SCALE:
        raise ImageError(f"{name} of dtype {arr.dtype}: expected uint8, uint16 or float in [0, 1]")
    return arr[:, :, None] if arr.ndim == 2 else arr[:, :, :3]


def _check_unit_range(arr: np.ndarray, name: str) -> np.ndarray:
    if not (np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0):
        raise ImageError(f"{name}: float values must lie in [0, 1]; scale the image first")
    return arr


def _to_unit_float(raw: np.ndarray) -> np.ndarray:
    """Scale integers to float32 [0, 1] by division, bit-identical to ``to_tensor``."""
    scale = _INT_SCALE.get(raw.dtype)
    if scale is None:
        return raw.astype(np.float32, copy=False)
    out = raw.astype(np.float32)
    out /= np.float32(scale)
    return out


# ---------------------------------------------------------------- resize and normalise


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (H, W, C) float32 to (h, w, C) as PyTorch's bilinear, no-antialias resize does.

    Same taps and weights; the arithmetic differs from PyTorch's only in float32 rounding.
    """
    if image.ndim != 3:
        raise ValueError(f"expected an (H, W, C) array, got shape {image.shape}")
    return _resize(image.astype(np.float32, copy=False), size)


def _resize(raw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a raw (H, W, C) array into one (h, w, C) float32 array."""
    h, w = _check_size(size)
    out = np.empty((h, w, raw.shape[2]), dtype=np.float32)
    for band, block in _resize_bands(raw, (h, w)):
        out[band] = block
    return out


def _resize_bands(raw: np.ndarray, size: tuple[int, int]) -> Iterator[tuple[slice, np.ndarray]]:
    """Separable two-tap resize, yielded in bands of output rows as (rows, (n, w, C) float32).

    Integers come out scaled to [0, 1]: the division rides on the first pass's weights. Bands
    keep every temporary small, so it stays in cache and reuses freed memory: whole-image
    temporaries fault in fresh pages on every call (measured 1.5-1.8x slower from 1706x1270).
    """
    h, w = _check_size(size)
    src_h, src_w, channels = raw.shape
    i0, i1, w0, w1 = _taps(src_h, h)
    cols = _taps(src_w, w)
    unit = np.float32(_INT_SCALE.get(raw.dtype, 1.0))
    one = np.float32(1.0)
    rows_first = _rows_first(src_h, src_w, h, w)
    step = max(1, _BAND_SAMPLES // (max(src_w, w) * channels))
    for start in range(0, h, step):
        band = slice(start, min(start + step, h))
        if rows_first:
            rows = _lerp(raw, (i0[band], i1[band], w0[band], w1[band]), 0, unit)
            yield band, _lerp(rows, cols, 1, one)
        else:  # resize the source rows this band reads along W, then blend them along H.
            first, stop = int(i0[band.start]), int(i1[band.stop - 1]) + 1
            span = _lerp(raw[first:stop], cols, 1, unit)
            local = (i0[band] - first, i1[band] - first, w0[band], w1[band])
            yield band, _lerp(span, local, 0, one)


def _rows_first(src_h: int, src_w: int, h: int, w: int) -> bool:
    """Whether resizing rows (along H) first is the cheaper order of the two passes.

    A gather along H copies whole rows; one along W copies single samples and measured 2-6x
    dearer per output sample (``benchmarks/preprocess_parity.py --pass-order`` checks the pick).
    """
    return h * src_w + _COL_COST * h * w <= _COL_COST * src_h * w + h * w


Taps: TypeAlias = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _taps(n_in: int, n_out: int) -> Taps:
    """Two source indices and their weights per output sample, as PyTorch computes them.

    align_corners=False: src = (dst + 0.5) * n_in / n_out - 0.5, clamped at 0. PyTorch's float
    kernel divides in float32 and forms src with one fused multiply-add; float64 arithmetic
    rounded once to float32 reproduces that, so both pick the same taps and weights.
    """
    scale = np.float64(np.float32(n_in) / np.float32(n_out))
    src = ((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    np.maximum(src, np.float32(0.0), out=src)
    i0 = np.minimum(np.floor(src).astype(np.intp), n_in - 1)
    w1 = np.clip(src - i0.astype(np.float32), np.float32(0.0), np.float32(1.0))
    w0 = np.float32(1.0) - w1
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, w0, w1


def _lerp(a: np.ndarray, taps: Taps, axis: int, unit: np.float32) -> np.ndarray:
    """Blend the two gathered slices along ``axis``; only gathered samples become float32."""
    i0, i1, w0, w1 = taps
    if axis == 0:
        lo = np.take(a, i0, axis=0)
        hi = np.take(a, i1, axis=0)
    else:
        # Gather scalars from (H, W*C) rows: numpy's take is several times faster on single
        # samples than on C-wide blocks along the middle axis.
        rows, _, channels = a.shape
        flat = a.reshape(rows, -1)
        lanes = np.arange(channels)
        lo = np.take(flat, (i0[:, None] * channels + lanes).ravel(), axis=1)
        hi = np.take(flat, (i1[:, None] * channels + lanes).ravel(), axis=1)
        lo = lo.reshape(rows, -1, channels)
        hi = hi.reshape(rows, -1, channels)
    shape = (-1, 1, 1) if axis == 0 else (1, -1, 1)
    lo = lo.astype(np.float32, copy=False)
    hi = hi.astype(np.float32, copy=False)
    lo *= (w0 / unit).reshape(shape)
    hi *= (w1 / unit).reshape(shape)
    lo += hi
    return lo


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    h, w = (int(v) for v in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"output size must be positive, got {tuple(size)}")
    return h, w


def normalize(image_hwc: np.ndarray) -> np.ndarray:
    """ImageNet-normalise (h, w, 3) [0, 1] pixels into a new (3, h, w) float32 array."""
    if image_hwc.ndim != 3 or image_hwc.shape[2] != 3:
        raise ValueError(f"expected an (h, w, 3) array, got shape {image_hwc.shape}")
    out = np.empty((3, *image_hwc.shape[:2]), dtype=np.float32)
    _normalize_into(image_hwc, out)
    return out


def _normalize_into(image_hwc: np.ndarray, out: np.ndarray) -> None:
    """Subtract then divide, in float32, like torchvision's ``Normalize``."""
    np.subtract(np.moveaxis(image_hwc, 2, 0), IMAGENET_MEAN[:, None, None], out=out)
    out /= IMAGENET_STD[:, None, None]


def preprocess(source: ImageSource, size: tuple[int, int]) -> np.ndarray:
    """Decode, resize to ``size`` (h, w) and normalise: the model's (3, h, w) float32 input."""
    out = np.empty((3, *_check_size(size)), dtype=np.float32)
    _preprocess_into(source, out)
    return out


def preprocess_batch(sources: Sequence[ImageSource], size: tuple[int, int]) -> np.ndarray:
    """Pre-process several images into one (B, 3, h, w) float32 batch."""
    out = np.empty((len(sources), 3, *_check_size(size)), dtype=np.float32)
    for source, slot in zip(sources, out, strict=True):
        _preprocess_into(source, slot)
    return out


def _preprocess_into(source: ImageSource, out: np.ndarray) -> None:
    for band, block in _resize_bands(_decode(source), out.shape[1:]):
        if block.shape[2] == 1:  # grey: resize one plane, broadcast it to three.
            block = np.broadcast_to(block, (*block.shape[:2], 3))
        _normalize_into(block, out[:, band])


# ---------------------------------------------------------------- inputs from the command line


def find_images(paths: Iterable[str | os.PathLike[str]], recursive: bool = True) -> list[Path]:
    """Collect image files: files as given, folders walked for ``IMAGE_EXTENSIONS``.

    Paths come back absolute (normalised, symlinks kept) so the same file named two ways is
    listed once, sorted by path components so folder order does not depend on the file system.
    Hidden entries (".name") inside walked folders are skipped: they are thumbnails or
    AppleDouble files, not photos.
    """
    found: set[Path] = set()
    for given in paths:
        path = Path(os.path.abspath(given))
        if path.is_dir():
            found.update(_walk(path, recursive))
        elif path.exists():
            found.add(path)
        else:
            raise UsageError(f"{given}: no such file or folder")
    return sorted(found, key=lambda p: p.parts)


def _walk(folder: Path, recursive: bool) -> Iterable[Path]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if recursive and not d.startswith(".")]
        for name in files:
            path = Path(root, name)
            if (
                not name.startswith(".")
                and path.suffix.lower() in IMAGE_EXTENSIONS
                and path.is_file()
            ):
                yield path


_RESOLUTION = re.compile(r"\s*(\d+)\s*(?:x\s*(\d+))?\s*", re.IGNORECASE)


def check_resolution(size: int | tuple[int, int] | str) -> tuple[int, int]:
    """Parse 322, "322" or "322x480" (H x W) into a model resolution (h, w) and validate it.

    Both sides must be multiples of the 14-pixel patch and at least 210 (15 patches).
    """
    if isinstance(size, str):
        match = _RESOLUTION.fullmatch(size)
        if match is None:
            raise UsageError(f"resolution {size!r}: expected N or HxW, e.g. 322 or 322x480")
        h = int(match.group(1))
        w = int(match.group(2) or h)
    elif isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        h = w = int(size)
    elif (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size)
    ):
        h, w = int(size[0]), int(size[1])
    else:
        raise UsageError(f"resolution {size!r}: expected N or HxW, e.g. 322 or 322x480")
    for side in (h, w):
        _check_side(side)
    return h, w


def _check_side(side: int) -> None:
    if side % PATCH_SIZE:
        below = side - side % PATCH_SIZE
        options = [v for v in (below, below + PATCH_SIZE) if v >= MIN_SIDE] or [MIN_SIDE]
        raise UsageError(
            f"resolution {side} is not a multiple of {PATCH_SIZE}: use "
            + " or ".join(str(v) for v in options)
        )
    if side < MIN_SIDE:
        raise UsageError(
            f"resolution {side} is too small: use {MIN_SIDE} or more "
            f"(at least {MIN_GRID} patches of {PATCH_SIZE} pixels a side)"
        )
