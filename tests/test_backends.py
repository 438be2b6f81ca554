"""onnx and torch backends: same interface, same numbers, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fol_infer.backends import open_encoder
from fol_infer.bundle import Bundle
from fol_infer.errors import CheckpointError, UsageError
from fol_infer.parity import compare, load_reference, verify


@pytest.mark.slow
@pytest.mark.parametrize("bundle_fixture", ["tiny_bundle", "tiny_bundle_322"])
def test_onnx_matches_the_pytorch_reference(
    bundle_fixture: str, request: pytest.FixtureRequest
) -> None:
    bundle = Bundle.open(request.getfixturevalue(bundle_fixture))
    with open_encoder(bundle, "onnx") as encoder:
        report = verify(bundle, encoder)
    assert report.passed, report.failures
    assert report.min_global_cosine >= 0.99999 and report.max_token_diff <= 1e-4
    assert report.count_agreement == 1.0 and report.position_agreement == 1.0


@pytest.mark.slow
def test_torch_backend_reproduces_its_reference_and_batch_is_dynamic(tiny_bundle: Path) -> None:
    pytest.importorskip("torch")
    bundle = Bundle.open(tiny_bundle)
    reference = load_reference(bundle)
    torch_enc = open_encoder(bundle, "torch")
    onnx_enc = open_encoder(bundle, "onnx")
    assert compare(reference, torch_enc.encode(reference["images"])).passed
    three = np.concatenate([reference["images"], reference["images"][:1]])
    for batch in (reference["images"][:1], three):
        a, b = torch_enc.encode(batch), onnx_enc.encode(batch)
        assert a.local is not None and b.local is not None
        np.testing.assert_allclose(a.descriptors, b.descriptors, atol=1e-5)
        np.testing.assert_array_equal(a.local.counts, b.local.counts)


def test_global_only_never_runs_the_local_branch(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder = open_encoder(Bundle.open(tiny_bundle), "onnx")
    monkeypatch.setattr(encoder, "encode_local", lambda *_: pytest.fail("local branch ran"))
    out = encoder.encode(load_reference(Bundle.open(tiny_bundle))["images"], local=False)
    assert out.local is None and out.descriptors.shape == (2, 8448)
    with pytest.raises(ValueError, match="local branch did not run"):
        out.token_list()


def test_wrong_resolution_is_a_clear_error(tiny_bundle: Path) -> None:
    encoder = open_encoder(Bundle.open(tiny_bundle), "onnx")
    with pytest.raises(UsageError, match="built for 210x224"):
        encoder.encode_global(np.zeros((1, 3, 322, 322), np.float32))
    with pytest.raises(UsageError, match=r"\(B, 3, H, W\)"):
        encoder.encode_global(np.zeros((3, 210, 224), np.float32))


def test_unknown_backend_and_moved_checkpoint(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = Bundle.open(tiny_bundle)
    with pytest.raises(UsageError, match="unknown backend"):
        open_encoder(bundle, "tflite")
    with pytest.raises(CheckpointError, match="--checkpoint"):
        open_encoder(bundle, "torch", checkpoint=tmp_path / "elsewhere.pth")


def test_token_list_drops_padding(tiny_bundle: Path) -> None:
    encoder = open_encoder(Bundle.open(tiny_bundle), "onnx")
    out = encoder.encode(load_reference(Bundle.open(tiny_bundle))["images"])
    assert out.local is not None
    assert [len(t) for t in out.token_list()] == out.local.counts.tolist()


def test_region_mismatch_is_excused_only_at_an_exact_confidence_tie(tiny_bundle_322: Path) -> None:
    from fol_infer.parity import boundary_ties

    bundle = Bundle.open(tiny_bundle_322)
    reference = load_reference(bundle)
    out = open_encoder(bundle).encode(reference["images"])
    assert out.local is not None
    flipped = out.local.region_mask.copy()
    flipped[0] = ~flipped[0]  # a different selection on image 0
    out.local.region_mask = flipped
    assert not compare(reference, out).passed  # no tie in the reference: a real failure
    conf = reference["confidence"].copy().reshape(2, -1)
    order = np.argsort(-conf[0], kind="stable")
    conf[0, order[225]] = conf[0, order[224]]  # now the 225th and 226th places tie
    reference["confidence"] = conf.reshape(reference["confidence"].shape)
    assert boundary_ties(reference["confidence"]).tolist() == [True, False]
    report = compare(reference, out)
    assert report.boundary_ties == 1 and report.position_agreement == 0.5
    assert report.untied_position_agreement == 1.0
