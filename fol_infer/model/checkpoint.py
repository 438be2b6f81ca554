"""Load FoL checkpoints strictly and safely, and make seeded UNTRAINED ones for testing.

Published checkpoints are pickles: a dict with ``model_state_dict`` (other keys beside it) or a
bare state dict, keys possibly prefixed ``module.`` (DataParallel). The published loader uses
``strict=False``, which hides typos; here every missing, unexpected or mis-shaped key is named.
Pickles run code when unpickled, so ``weights_only=True`` always, unless the user opts in.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fol_infer.errors import CheckpointError
from fol_infer.files.atomic import write_outputs
from fol_infer.model.arch import ArchSpec, detect_arch, expected_shapes, get_arch
from fol_infer.model.fol import FoLModel

log = logging.getLogger(__name__)

STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model")
UNTRAINED_KEY = "fol_infer_untrained"
MAX_LISTED = 12


@dataclass
class LoadedCheckpoint:
    model: FoLModel
    arch: ArchSpec
    trained: bool  # False for make-checkpoint's seeded random weights
    path: Path


def _read_pickle(path: Path, trust: bool) -> object:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint is an empty file: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    # torch.save writes a zip archive (PK..) since 1.6, a bare pickle (0x80 ..) before.
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle); "
            "pass an FoL .pth file"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as exc:  # torch.load raises many types on foreign files
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        if not trust and "weights only load failed" in lines[0].lower():
            reason = next(
                (ln.strip() for ln in lines if "unsupported global" in ln.lower()), lines[0]
            )
            reason = reason.split(" Please use")[0]
            raise CheckpointError(
                f"{path} needs full unpickling, which can run arbitrary code ({reason}); "
                "if you trust its source, rerun with --trust-checkpoint"
            ) from None
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint ({type(exc).__name__}: {lines[0][:120]}); "
            "pass an FoL .pth file"
        ) from None


def _state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"{path} holds no state dict (expected a dict of tensors, or one under "
            f"{' / '.join(STATE_DICT_KEYS)})"
        )
    tensors = {}
    for key, value in obj.items():
        name = str(key)
        tensors[name[len("module.") :] if name.startswith("module.") else name] = value
    return tensors


def _listed(keys: list[str]) -> str:
    more = f" ... and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else ""
    return ", ".join(keys[:MAX_LISTED]) + more


def check_state_dict(state: Mapping[str, object], arch: ArchSpec) -> None:
    """Raise one error that names every missing, unexpected and mis-shaped key."""
    want = expected_shapes(arch)
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    wrong = []
    for key in sorted(set(want) & set(state)):
        value = state[key]
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        if shape != want[key]:
            got = "not a tensor" if shape is None else str(shape)
            wrong.append(f"{key} {got} != {want[key]}")
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {_listed(unexpected)}")
    if wrong:
        problems.append(f"wrong shape {len(wrong)}: {_listed(wrong)}")
    if problems:
        raise CheckpointError(f"checkpoint does not match FoL {arch.name}: " + "; ".join(problems))


def load_checkpoint(path: str | Path, trust: bool = False) -> LoadedCheckpoint:
    """Read, validate and load a checkpoint into an eval-mode float32 FoLModel."""
    path = Path(path)
    if trust:
        warnings.warn(
            f"--trust-checkpoint: fully unpickling {path}, which can run any code it holds",
            stacklevel=2,
        )
    raw = _read_pickle(path, trust)
    trained = not (isinstance(raw, Mapping) and raw.get(UNTRAINED_KEY) is True)
    state = _state_dict(raw, path)
    shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    arch = detect_arch(shapes)
    check_state_dict(state, arch)
    model = FoLModel(arch)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.eval()
    if not trained:
        log.warning("%s holds UNTRAINED random weights (made by make-checkpoint)", path)
    return LoadedCheckpoint(model=model, arch=arch, trained=trained, path=path)


def random_model(arch: ArchSpec | str, seed: int) -> FoLModel:
    """A seeded FoL model with DINOv2-like init scales (unit LayerNorm, small weights)."""
    arch = get_arch(arch) if isinstance(arch, str) else arch
    generator = torch.Generator().manual_seed(seed)
    model = FoLModel(arch)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
                param.fill_(1.0)
            elif name.endswith(".gamma"):
                param.fill_(0.1)  # layer scale: keeps the residual stream well conditioned
            elif param.ndim == 1:
                param.normal_(0.0, 0.02, generator=generator)
            else:
                fan_in = param[0].numel() if param.ndim > 1 else param.numel()
                param.normal_(0.0, fan_in**-0.5, generator=generator)
        model.backbone.model.pos_embed.normal_(0.0, 0.02, generator=generator)
        model.backbone.model.cls_token.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def make_checkpoint(arch: str, seed: int, out: str | Path) -> Path:
    """Write a seeded random checkpoint in the published layout, marked UNTRAINED."""
    out = Path(out)
    model = random_model(arch, seed)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    payload = {
        "model_state_dict": state,
        UNTRAINED_KEY: True,
        "fol_infer_arch": arch,
        "fol_infer_seed": seed,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_outputs({out: lambda f: torch.save(payload, f)})  # atomic: never half a checkpoint
    return out


def describe_checkpoint(path: str | Path, trust: bool = False) -> dict[str, object]:
    """What `fol-infer info` says of a checkpoint, without building the model."""
    from fol_infer.files.integrity import sha256_file

    path = Path(path)
    raw = _read_pickle(path, trust)
    state = _state_dict(raw, path)
    shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    arch = detect_arch(shapes)
    check_state_dict(state, arch)
    nested = isinstance(raw, Mapping) and any(
        isinstance(raw.get(k), Mapping) for k in STATE_DICT_KEYS
    )
    return {
        "kind": "checkpoint",
        "path": str(path),
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "arch": arch.to_dict() | {"heads": arch.heads},
        "parameters": int(sum(v.numel() for v in state.values() if isinstance(v, torch.Tensor))),
        "trained": not (isinstance(raw, Mapping) and raw.get(UNTRAINED_KEY) is True),
        "layout": "nested state dict" if nested else "bare state dict",
        "other_top_level_keys": sorted(str(k) for k in raw if k not in STATE_DICT_KEYS)
        if nested and isinstance(raw, Mapping)
        else [],
    }
