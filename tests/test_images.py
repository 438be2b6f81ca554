"""Decoding and pre-processing: every odd input decodes or fails with a one-line ImageError,
and the numpy resize/normalise matches PyTorch's bilinear (no antialias) pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fol_infer import images
from fol_infer.errors import ImageError, UsageError
from fol_infer.images import (
    IMAGE_EXTENSIONS,
    ImageSource,
    check_resolution,
    find_images,
    load_rgb,
    normalize,
    preprocess,
    preprocess_batch,
    resize_bilinear,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
NO_TORCH = "torch not installed: it is the reference for the resize and pre-processing"


def real_jpegs() -> list[Path]:
    if not DATA.is_dir():
        pytest.skip(f"real test images not found at {DATA} (a clone without shared/data)")
    found = sorted(DATA.rglob("*.jpg"))
    if not found:
        pytest.skip(f"no JPEGs under {DATA}")
    return found


def pixel_count(path: Path) -> int:
    with Image.open(path) as im:
        return im.width * im.height


def pil_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def torch_resize(x_hwc: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    torch = pytest.importorskip("torch", reason=NO_TORCH)
    t = torch.from_numpy(np.ascontiguousarray(x_hwc)).permute(2, 0, 1)[None]
    out = torch.nn.functional.interpolate(
        t, size=size, mode="bilinear", align_corners=False, antialias=False
    )
    return out[0].permute(1, 2, 0).numpy()


def torch_preprocess(rgb_u8: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The published order: to_tensor -> normalise at full size -> interpolate."""
    torch = pytest.importorskip("torch", reason=NO_TORCH)
    x = torch.from_numpy(rgb_u8.copy()).permute(2, 0, 1).float().div(255)
    x = (x - torch.from_numpy(MEAN)[:, None, None]) / torch.from_numpy(STD)[:, None, None]
    out = torch.nn.functional.interpolate(
        x[None], size=size, mode="bilinear", align_corners=False, antialias=False
    )
    return out[0].numpy()


def rand_u8(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def assert_one_line_error(exc: pytest.ExceptionInfo[ImageError], name: str) -> None:
    message = str(exc.value)
    assert name in message
    assert "\n" not in message


# ---------------------------------------------------------------- decoding modes


def test_rgb_png_round_trips_exactly(tmp_path: Path) -> None:
    rgb = rand_u8((9, 13, 3))
    Image.fromarray(rgb).save(tmp_path / "x.png")
    out = load_rgb(tmp_path / "x.png")
    assert out.dtype == np.float32 and out.shape == (9, 13, 3)
    np.testing.assert_array_equal(out, rgb.astype(np.float32) / np.float32(255))


def test_grayscale_png_becomes_three_equal_channels(tmp_path: Path) -> None:
    grey = rand_u8((7, 5))
    Image.fromarray(grey).save(tmp_path / "g.png")
    out = load_rgb(str(tmp_path / "g.png"))
    assert out.shape == (7, 5, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], grey / np.float32(255))


def test_one_bit_image_is_black_and_white(tmp_path: Path) -> None:
    bits = rand_u8((6, 10)) > 127
    Image.fromarray(bits).convert("1").save(tmp_path / "b.png")
    out = load_rgb(tmp_path / "b.png")
    np.testing.assert_array_equal(out[:, :, 0], bits.astype(np.float32))


def test_grey_with_alpha_drops_alpha(tmp_path: Path) -> None:
    la = rand_u8((4, 6, 2))
    la[:, :, 1] = 0  # fully transparent: the grey values must survive untouched
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    out = load_rgb(tmp_path / "la.png")
    np.testing.assert_array_equal(out[:, :, 1], la[:, :, 0] / np.float32(255))


def test_rgba_png_drops_alpha_without_premultiplying(tmp_path: Path) -> None:
    rgba = rand_u8((5, 8, 4))
    rgba[:, :, 3] = 0
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_rgb(tmp_path / "a.png"), rgba[:, :, :3] / np.float32(255))


def test_palette_png_looks_up_its_palette(tmp_path: Path) -> None:
    palette = rand_u8((256, 3), seed=1)
    index = rand_u8((6, 7), seed=2)
    im = Image.fromarray(index, mode="L").convert("P")
    im.putpalette(palette.ravel().tolist())
    im.info["transparency"] = 3  # palette transparency must not change the colours either
    im.save(tmp_path / "p.png", transparency=3)
    out = load_rgb(tmp_path / "p.png")
    np.testing.assert_array_equal(out, palette[index] / np.float32(255))


def test_cmyk_jpeg_converts_to_rgb(tmp_path: Path) -> None:
    # Pure cyan ink is (0, 1, 1) in RGB: red absent, green and blue full (JPEG is lossy).
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(tmp_path / "c.jpg")
    out = load_rgb(tmp_path / "c.jpg")
    assert out.shape == (16, 16, 3)
    assert out[:, :, 0].max() < 0.05
    assert out[:, :, 1:].min() > 0.95


def test_sixteen_bit_png_keeps_its_precision(tmp_path: Path) -> None:
    # Neighbouring 16-bit values that one 8-bit level would merge must stay apart.
    grey = (np.arange(12 * 20, dtype=np.uint16).reshape(12, 20) * 257 + 1).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")  # Pillow's 16-bit grey, which convert("RGB") would clip
    out = load_rgb(tmp_path / "g16.png")
    assert grey.max() > 255
    np.testing.assert_allclose(out[:, :, 2], grey / 65535.0, rtol=0, atol=1e-7)
    assert len(np.unique(out[:, :, 0])) == len(np.unique(grey))


def test_float_tiff_in_unit_range_is_read_as_is(tmp_path: Path) -> None:
    values = np.random.default_rng(3).random((5, 6), dtype=np.float32)
    Image.fromarray(values, mode="F").save(tmp_path / "f.tif")
    np.testing.assert_array_equal(load_rgb(tmp_path / "f.tif")[:, :, 0], values)


def test_exif_orientation_is_not_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(rand_u8((10, 30, 3))).save(tmp_path / "r.jpg", exif=exif)
    assert load_rgb(tmp_path / "r.jpg").shape == (10, 30, 3)


def test_pil_image_source(tmp_path: Path) -> None:
    rgb = rand_u8((4, 4, 3))
    np.testing.assert_array_equal(load_rgb(Image.fromarray(rgb)), rgb / np.float32(255))


# ---------------------------------------------------------------- bad files


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file") as exc:
        load_rgb(tmp_path / "nope.jpg")
    assert_one_line_error(exc, "nope.jpg")


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").touch()
    with pytest.raises(ImageError, match="empty") as exc:
        load_rgb(tmp_path / "empty.jpg")
    assert_one_line_error(exc, "empty.jpg")


def test_text_file_named_jpg(tmp_path: Path) -> None:
    (tmp_path / "notes.jpg").write_text("not a picture\n")
    with pytest.raises(ImageError, match="not an image") as exc:
        load_rgb(tmp_path / "notes.jpg")
    assert_one_line_error(exc, "notes.jpg")


@pytest.mark.parametrize("keep", [0.5, 0.1])
def test_truncated_jpeg_fails(tmp_path: Path, keep: float) -> None:
    Image.fromarray(rand_u8((96, 96, 3))).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ImageError) as exc:
        load_rgb(tmp_path / "cut.jpg")
    assert_one_line_error(exc, "cut.jpg")
    with pytest.raises(ImageError):
        preprocess(tmp_path / "cut.jpg", (14, 14))


def test_folder_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="folder"):
        load_rgb(tmp_path)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [40, 100])  # Pillow warns past the limit, raises past twice it
def test_decompression_bomb_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, side: int
) -> None:
    Image.new("RGB", (side, side)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="decompression") as exc:
        load_rgb(tmp_path / "big.png")
    assert_one_line_error(exc, "big.png")


# ---------------------------------------------------------------- arrays


def test_uint8_arrays_of_every_accepted_shape() -> None:
    rgba = rand_u8((3, 4, 4))
    np.testing.assert_array_equal(load_rgb(rgba), rgba[:, :, :3] / np.float32(255))
    np.testing.assert_array_equal(load_rgb(rgba[:, :, 0])[:, :, 2], rgba[:, :, 0] / np.float32(255))


def test_uint16_and_float_arrays() -> None:
    deep = np.array([[0, 1, 65535]], dtype=np.uint16)
    np.testing.assert_allclose(load_rgb(deep)[0, :, 0], deep[0] / 65535.0, rtol=0, atol=1e-7)
    unit = np.random.default_rng(4).random((2, 3, 3))
    out = load_rgb(unit)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, unit.astype(np.float32))
    assert out is not unit and not np.shares_memory(out, unit)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((4, 4, 2), np.uint8),
        np.zeros((4, 4, 3, 1), np.uint8),
        np.zeros((0, 4, 3), np.uint8),
        np.zeros((4, 4, 3), np.int32),
        np.full((4, 4, 3), 1.5, np.float32),
        np.full((4, 4, 3), np.nan, np.float32),
    ],
    ids=["two-channels", "4d", "empty", "int32", "float-above-1", "nan"],
)
def test_bad_arrays_are_refused(bad: np.ndarray) -> None:
    with pytest.raises(ImageError) as exc:
        load_rgb(bad)
    assert_one_line_error(exc, "array")


def test_unsupported_source_type() -> None:
    with pytest.raises(ImageError, match="int"):
        load_rgb(3)  # type: ignore[arg-type]


# ---------------------------------------------------------------- resize and normalise


@settings(max_examples=60, deadline=None)
@given(
    src=st.tuples(st.integers(1, 48), st.integers(1, 48), st.integers(1, 4)),
    dst=st.tuples(st.integers(1, 48), st.integers(1, 48)),
    seed=st.integers(0, 2**16),
)
def test_resize_matches_torch_on_random_shapes(
    src: tuple[int, int, int], dst: tuple[int, int], seed: int
) -> None:
    x = np.random.default_rng(seed).random(src, dtype=np.float32)
    out = resize_bilinear(x, dst)
    assert out.dtype == np.float32 and out.shape == (*dst, src[2])
    np.testing.assert_allclose(out, torch_resize(x, dst), rtol=0, atol=1e-5)


@pytest.mark.parametrize("band_samples", [1, 700])  # one output row per band, then a few
@pytest.mark.parametrize(
    ("src", "dst", "rows_first"),
    [((60, 50, 3), (37, 23), True), ((20, 90, 3), (70, 15), False), ((9, 40, 1), (31, 8), False)],
)
def test_resize_in_bands_matches_torch_in_both_pass_orders(
    monkeypatch: pytest.MonkeyPatch,
    band_samples: int,
    src: tuple[int, int, int],
    dst: tuple[int, int],
    rows_first: bool,
) -> None:
    assert images._rows_first(src[0], src[1], *dst) is rows_first
    monkeypatch.setattr(images, "_BAND_SAMPLES", band_samples)
    raw = rand_u8(src, seed=src[1])
    expected = torch_resize(raw / np.float32(255), dst)
    np.testing.assert_allclose(images._resize(raw, dst), expected, rtol=0, atol=1e-5)


def test_resize_to_same_size_is_identity() -> None:
    x = np.random.default_rng(5).random((11, 17, 3), dtype=np.float32)
    np.testing.assert_array_equal(resize_bilinear(x, (11, 17)), x)


@pytest.mark.parametrize("size", [(322, 322), (504, 504), (37, 53), (210, 490), (1900, 1100)])
def test_resize_matches_torch_on_real_jpegs(size: tuple[int, int]) -> None:
    paths = real_jpegs()
    # The largest photo (down-sampling and up-sampling) and the smallest (up-sampling).
    by_area = sorted(paths, key=lambda p: (pixel_count(p), p.name))
    for path in (by_area[0], by_area[-1]):
        rgb = load_rgb(path)
        np.testing.assert_allclose(
            resize_bilinear(rgb, size), torch_resize(rgb, size), rtol=0, atol=1e-5
        )


def test_preprocess_matches_torch_on_real_jpegs() -> None:
    for path in real_jpegs():
        rgb = pil_rgb(path)
        for size in ((322, 322), (504, 504)):
            ours = preprocess(path, size)
            assert ours.shape == (3, *size) and ours.dtype == np.float32
            np.testing.assert_allclose(ours, torch_preprocess(rgb, size), rtol=0, atol=1e-4)


@pytest.mark.parametrize("shape", [(61, 45, 3), (20, 33), (17, 70, 4)], ids=["rgb", "grey", "rgba"])
@pytest.mark.parametrize("size", [(28, 42), (98, 70)], ids=["down", "up"])
def test_preprocess_matches_torch_on_generated_images(
    tmp_path: Path, shape: tuple[int, ...], size: tuple[int, int]
) -> None:
    Image.fromarray(rand_u8(shape, seed=len(shape))).save(tmp_path / "x.png")
    rgb = pil_rgb(tmp_path / "x.png")
    ours = preprocess(tmp_path / "x.png", size)
    np.testing.assert_allclose(ours, torch_preprocess(rgb, size), rtol=0, atol=1e-4)


def test_normalize_uses_imagenet_statistics_in_rgb_order() -> None:
    image = np.broadcast_to(MEAN, (2, 3, 3)).copy()
    image[0, 0] = MEAN + STD  # one standard deviation above the mean in every channel
    out = normalize(image)
    assert out.shape == (3, 2, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0, 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(out[:, 1:, :], 0.0, atol=1e-6)


def test_preprocess_batch_stacks_preprocess(tmp_path: Path) -> None:
    Image.fromarray(rand_u8((30, 40, 3))).save(tmp_path / "a.png")
    sources: list[ImageSource] = [
        tmp_path / "a.png",
        rand_u8((25, 25), seed=9),
        Image.fromarray(rand_u8((9, 9, 3))),
    ]
    batch = preprocess_batch(sources, (14, 28))
    assert batch.shape == (3, 3, 14, 28) and batch.dtype == np.float32
    for row, source in zip(batch, sources, strict=True):
        np.testing.assert_array_equal(row, preprocess(source, (14, 28)))
    assert preprocess_batch([], (14, 28)).shape == (0, 3, 14, 28)


# ---------------------------------------------------------------- find_images


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_find_images_walks_sorts_and_deduplicates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "db"
    wanted = [
        touch(root / "b.JPG"),
        touch(root / "a" / "z.png"),
        touch(root / "a-b" / "c.webp"),
        touch(root / "a" / "deep" / "y.TIFF"),
    ]
    touch(root / "notes.txt")
    touch(root / ".thumbs" / "t.jpg")
    touch(root / "._b.jpg")
    odd = touch(tmp_path / "photo.raw")  # given explicitly: the decoder decides
    monkeypatch.chdir(tmp_path)
    found = find_images([root, "db/b.JPG", Path("photo.raw"), root / "a"])
    assert found == sorted({*wanted, odd}, key=lambda p: p.parts)
    assert all(p.is_absolute() for p in found)
    # Sorted by path components: all of folder "a" comes before "a-b" (plain strings would
    # put "a-b/..." first, as "-" sorts before "/").
    assert [p.parent.name for p in found[:3]] == ["deep", "a", "a-b"]
    assert find_images([root], recursive=False) == [root / "b.JPG"]


def test_find_images_missing_path(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file or folder"):
        find_images([tmp_path / "absent"])


def test_image_extensions_are_lower_case_with_dot() -> None:
    assert {".jpg", ".jpeg", ".png"} <= IMAGE_EXTENSIONS
    assert all(e.startswith(".") and e == e.lower() for e in IMAGE_EXTENSIONS)


# ---------------------------------------------------------------- check_resolution


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (322, (322, 322)),
        ("504", (504, 504)),
        ("322x476", (322, 476)),
        (" 210 X 224 ", (210, 224)),
        ((336, 210), (336, 210)),
    ],
)
def test_check_resolution_accepts(given: object, expected: tuple[int, int]) -> None:
    assert check_resolution(given) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("given", "hint"),
    [
        (323, "use 322 or 336"),
        ("322x480", "480 is not a multiple of 14: use 476 or 490"),
        (200, "use 210"),
        (196, "too small"),
        ("big", "322x480"),
        (True, "322x480"),
        ((322,), "322x480"),
    ],
)
def test_check_resolution_refuses_with_nearest_values(given: object, hint: str) -> None:
    with pytest.raises(UsageError, match=hint):
        check_resolution(given)  # type: ignore[arg-type]
