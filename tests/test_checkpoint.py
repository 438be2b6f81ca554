"""Checkpoint loading: every published layout, strict key checks, safe unpickling."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="checkpoint tests need PyTorch")

from fol_infer.errors import CheckpointError  # noqa: E402
from fol_infer.model.arch import ARCHS, detect_arch, expected_shapes  # noqa: E402
from fol_infer.model.checkpoint import (  # noqa: E402
    describe_checkpoint,
    load_checkpoint,
    make_checkpoint,
    random_model,
)


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    return random_model("tiny", seed).state_dict()


@pytest.mark.parametrize(
    "layout",
    ["nested-module", "nested-bare", "bare-module", "bare", "extra-keys"],
)
def test_every_published_layout_loads(tmp_path: Path, layout: str) -> None:
    state = _state()
    prefixed = {f"module.{k}": v for k, v in state.items()}
    payload: object = {
        "nested-module": {"model_state_dict": prefixed},
        "nested-bare": {"model_state_dict": state},
        "bare-module": prefixed,
        "bare": state,
        "extra-keys": {"model_state_dict": prefixed, "epoch": 3, "best_r5": 97.1, "optimizer": {}},
    }[layout]
    path = tmp_path / "c.pth"
    torch.save(payload, path)
    loaded = load_checkpoint(path)
    assert loaded.arch.name == "tiny"
    assert loaded.trained  # not made by make-checkpoint
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_errors_name_missing_unexpected_and_misshaped_keys(tmp_path: Path) -> None:
    state = _state()
    del state["aggregator.score.3.bias"]
    state["aggregator.scores.9.weight"] = torch.zeros(3)
    state["upconv2.bias"] = torch.zeros(64)
    path = tmp_path / "c.pth"
    torch.save({"model_state_dict": state}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "aggregator.score.3.bias" in message and "missing 1" in message
    assert "aggregator.scores.9.weight" in message and "unexpected 1" in message
    assert "upconv2.bias (64,) != (128,)" in message


def test_other_model_is_refused_with_its_keys(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.bias": torch.zeros(10)}, path)
    with pytest.raises(CheckpointError, match="not an FoL checkpoint.*conv1.weight"):
        load_checkpoint(path)


def test_shapes_matching_no_architecture(tmp_path: Path) -> None:
    state = {k: v for k, v in _state().items() if ".blocks.1." not in k}  # depth 1
    path = tmp_path / "c.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="width 64 and depth 1.*matches no supported"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [(b"", "empty file"), (b"hello, I am text\n", "not a PyTorch checkpoint")],
)
def test_not_a_checkpoint(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "c.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pth")


class _Custom:  # a class the safe unpickler refuses
    pass


def test_full_unpickling_needs_explicit_opt_in(tmp_path: Path) -> None:
    path = tmp_path / "c.pth"
    torch.save({"model_state_dict": _state(), "args": _Custom()}, path)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load_checkpoint(path)
    with pytest.warns(UserWarning, match="fully unpickling"):
        loaded = load_checkpoint(path, trust=True)
    assert loaded.arch.name == "tiny"


def test_make_checkpoint_is_seeded_and_marked_untrained(tmp_path: Path) -> None:
    a = make_checkpoint("tiny", 7, tmp_path / "a.pth")
    b = make_checkpoint("tiny", 7, tmp_path / "b.pth")
    c = make_checkpoint("tiny", 8, tmp_path / "c.pth")
    la, lb, lc = (load_checkpoint(p) for p in (a, b, c))
    assert not la.trained
    sa, sb, sc = (x.model.state_dict() for x in (la, lb, lc))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    raw = torch.load(a, weights_only=True)
    assert all(k.startswith("module.") for k in raw["model_state_dict"])  # published layout
    info = describe_checkpoint(a)
    assert info["trained"] is False and info["arch"]["name"] == "tiny"  # type: ignore[index]


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_every_architecture_is_detected_from_shapes(name: str) -> None:
    assert detect_arch(expected_shapes(ARCHS[name])).name == name


def test_model_parameter_names_match_the_expected_layout() -> None:
    model = random_model("tiny", 0)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_shapes(ARCHS["tiny"])


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = make_checkpoint("tiny", 0, tmp_path / "full.pth")
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint") as err:
        load_checkpoint(cut)
    assert "\n" not in str(err.value)
