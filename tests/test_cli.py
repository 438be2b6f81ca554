"""The command line end to end on tiny models: exit codes, messages, files written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fol_infer.cli import app

runner = CliRunner()


def run(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.mark.slow
def test_make_checkpoint_export_verify_info(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    ckpt = tmp_path / "tiny.pth"
    code, out = run("make-checkpoint", ckpt, "--arch", "tiny", "--seed", "3")
    assert code == 0 and "UNTRAINED" in out
    code, out = run("make-checkpoint", ckpt, "--arch", "tiny")
    assert code == 2 and "--force" in out
    bundle = tmp_path / "bundle"
    code, out = run("export", ckpt, "--out", bundle, "--resolution", "210")
    assert code == 0, out
    assert "TensorRT-ready" in out and "NOT" not in out
    code, out = run("export", ckpt, "--out", bundle, "--resolution", "210")
    assert code == 2 and "already holds a bundle: pass --force" in out
    code, out = run("verify", bundle, "--backend", "onnx")
    assert code == 0 and "passed" in out
    code, out = run("verify", bundle, "--backend", "torch")
    assert code == 0 and "passed" in out
    code, out = run("info", bundle, "--json")
    assert code == 0 and json.loads(out)["arch"]["name"] == "tiny"
    code, out = run("info", ckpt, "--json")
    assert code == 0 and json.loads(out)["trained"] is False


def test_verify_fails_with_exit_1_beyond_tolerance(tiny_bundle: Path, tmp_path: Path) -> None:
    from fol_infer.bundle import Manifest
    from fol_infer.files.integrity import sha256_file

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    with np.load(copy / "reference.npz") as ref:
        data = {k: ref[k] for k in ref.files}
    data["global"] = np.roll(data["global"], 1, axis=1)  # a wrong reference
    np.savez(copy / "reference.npz", **data)
    manifest = Manifest.from_dict(json.loads((copy / "manifest.json").read_text()))
    manifest.reference |= {
        "sha256": sha256_file(copy / "reference.npz"),
        "bytes": (copy / "reference.npz").stat().st_size,
    }
    manifest.write(copy)
    code, out = run("verify", copy, "--backend", "onnx")
    assert code == 1 and "FAILED" in out and "global cosine" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("export", "missing.pth"), "not found"),
        (("info", "missing-bundle/"), "not found"),
        (("verify", "missing-bundle/"), "not found"),
        (("make-checkpoint", "x.pth", "--arch", "vitz14"), "unknown architecture"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    args: tuple[str, ...], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out = run(*args)
    assert code == 2 and message in out
    assert out.count("error:") == 1 and "Traceback" not in out


def _odd_images(folder: Path) -> dict[str, bool]:
    """Image files that must decode (True) or be skipped with a reason (False)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "rgb.jpg")
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(folder / "rgba.png")
    Image.fromarray((rng.integers(0, 65535, (240, 260))).astype(np.uint16)).save(
        folder / "deep16.png"
    )
    full = (folder / "rgb.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not a picture")
    return {
        "rgb.jpg": True,
        "gray.png": True,
        "cmyk.jpg": True,
        "rgba.png": True,
        "deep16.png": True,
        "truncated.jpg": False,
        "empty.jpg": False,
        "notes.jpg": False,
    }


def test_encode_skips_unreadable_images_and_lists_them(tiny_bundle: Path, tmp_path: Path) -> None:
    images = tmp_path / "imgs" / "nested"
    images.mkdir(parents=True)
    expected = _odd_images(images)
    out = tmp_path / "enc.npz"
    code, log = run("encode", tiny_bundle, tmp_path / "imgs", "--out", out, "--batch", "3")
    assert code == 0, log
    for name in (n for n, ok in expected.items() if not ok):
        assert name in log, name
    with np.load(out) as enc:
        names = sorted(Path(p).name for p in enc["paths"])
        assert names == sorted(n for n, ok in expected.items() if ok)
        n = len(names)
        assert enc["global"].shape == (n, 8448) and enc["global"].dtype == np.float32
        assert enc["tokens"].shape == (n, 3600, 128) and enc["tokens"].dtype == np.float32
        assert enc["count"].shape == (n,)
        for tokens, count in zip(enc["tokens"], enc["count"]):
            assert not tokens[count:].any()
    assert "3 skipped" in log
    code, log = run(
        "encode", tiny_bundle, tmp_path / "imgs", "--out", tmp_path / "s.npz", "--strict"
    )
    assert code != 0 and not (tmp_path / "s.npz").exists()


def test_encode_matches_encoding_in_python(tiny_bundle: Path, tmp_path: Path) -> None:
    from fol_infer.backends import open_encoder
    from fol_infer.bundle import Bundle
    from fol_infer.images import preprocess_batch

    folder = tmp_path / "imgs"
    folder.mkdir()
    _odd_images(folder)
    out = tmp_path / "enc.npz"
    assert run("encode", tiny_bundle, folder / "rgb.jpg", folder / "gray.png", "--out", out)[0] == 0
    bundle = Bundle.open(tiny_bundle)
    with np.load(out) as enc:
        direct = open_encoder(bundle).encode(
            preprocess_batch(list(enc["paths"]), bundle.resolution)
        )
        np.testing.assert_allclose(enc["global"], direct.descriptors, atol=1e-6)
