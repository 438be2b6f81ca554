"""Supported FoL architectures and how to recognise them from a state dict (torch-free).

The architecture is read off parameter shapes (width from the patch embedding, depth from the
block count, SwiGLU from its weight names), so a user never has to name it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from fol_infer.errors import CheckpointError

# FoL's geometry (spec sections 3-6), defined here once for every layer of the toolkit.
PATCH_SIZE = 14
POS_GRID = 37  # DINOv2 hub models are trained at 518 px: 37 x 37 position embeddings
NUM_CLUSTERS = 64
CLUSTER_DIM = 128  # per-cluster feature width of the aggregator
SCENE_TOKEN_DIM = 256  # the aggregator's global scene token (token_features)
HIDDEN = 512  # width of the aggregator's MLPs
GLOBAL_DIM = NUM_CLUSTERS * CLUSTER_DIM + SCENE_TOKEN_DIM  # the global descriptor
UPCONV_DIM = 256  # width between the local head's two transposed convolutions
TOKEN_DIM = 128  # width of a local re-ranking token (the local head's output)
REGION_PATCHES = 225  # discriminative patches selected per image
MIN_GRID = math.isqrt(REGION_PATCHES)  # the smallest square patch grid holding them
POSITIONS_PER_PATCH = 16  # two stride-2 upsamplings: at most 4 x 4 token positions a patch
MAX_TOKENS = REGION_PATCHES * POSITIONS_PER_PATCH


@dataclass(frozen=True)
class ArchSpec:
    """Geometry of one DINOv2 backbone as FoL uses it."""

    name: str
    width: int
    depth: int
    ffn: str  # "mlp" (GELU) or "swiglu" (ViT-G)
    mlp_hidden: int

    @property
    def heads(self) -> int:
        return self.width // 64

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


ARCHS: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec("vits14", 384, 12, "mlp", 1536),
        ArchSpec("vitb14", 768, 12, "mlp", 3072),
        ArchSpec("vitl14", 1024, 24, "mlp", 4096),
        ArchSpec("vitg14", 1536, 40, "swiglu", 4096),
        # A two-block, 64-wide model so that tests and CI exercise every code path in seconds.
        ArchSpec("tiny", 64, 2, "mlp", 256),
    )
}


def get_arch(name: str) -> ArchSpec:
    try:
        return ARCHS[name]
    except KeyError:
        raise CheckpointError(
            f"unknown architecture {name!r}: choose one of {', '.join(ARCHS)}"
        ) from None


def expected_shapes(arch: ArchSpec) -> dict[str, tuple[int, ...]]:
    """Every parameter of an FoL model of this architecture, with its shape (hub names)."""
    c, n = arch.width, POS_GRID * POS_GRID + 1
    shapes: dict[str, tuple[int, ...]] = {
        "backbone.model.cls_token": (1, 1, c),
        "backbone.model.pos_embed": (1, n, c),
        "backbone.model.mask_token": (1, c),
        "backbone.model.patch_embed.proj.weight": (c, 3, PATCH_SIZE, PATCH_SIZE),
        "backbone.model.patch_embed.proj.bias": (c,),
        "backbone.model.norm.weight": (c,),
        "backbone.model.norm.bias": (c,),
    }
    for i in range(arch.depth):
        b = f"backbone.model.blocks.{i}."
        shapes.update(
            {
                b + "norm1.weight": (c,),
                b + "norm1.bias": (c,),
                b + "attn.qkv.weight": (3 * c, c),
                b + "attn.qkv.bias": (3 * c,),
                b + "attn.proj.weight": (c, c),
                b + "attn.proj.bias": (c,),
                b + "ls1.gamma": (c,),
                b + "norm2.weight": (c,),
                b + "norm2.bias": (c,),
                b + "ls2.gamma": (c,),
            }
        )
        if arch.ffn == "swiglu":
            shapes.update(
                {
                    b + "mlp.w12.weight": (2 * arch.mlp_hidden, c),
                    b + "mlp.w12.bias": (2 * arch.mlp_hidden,),
                    b + "mlp.w3.weight": (c, arch.mlp_hidden),
                    b + "mlp.w3.bias": (c,),
                }
            )
        else:
            shapes.update(
                {
                    b + "mlp.fc1.weight": (arch.mlp_hidden, c),
                    b + "mlp.fc1.bias": (arch.mlp_hidden,),
                    b + "mlp.fc2.weight": (c, arch.mlp_hidden),
                    b + "mlp.fc2.bias": (c,),
                }
            )
    a = "aggregator."
    shapes.update(
        {
            a + "token_features.0.weight": (HIDDEN, c),
            a + "token_features.0.bias": (HIDDEN,),
            a + "token_features.2.weight": (SCENE_TOKEN_DIM, HIDDEN),
            a + "token_features.2.bias": (SCENE_TOKEN_DIM,),
            a + "cluster_features.0.weight": (HIDDEN, c, 1, 1),
            a + "cluster_features.0.bias": (HIDDEN,),
            a + "cluster_features.3.weight": (CLUSTER_DIM, HIDDEN, 1, 1),
            a + "cluster_features.3.bias": (CLUSTER_DIM,),
            a + "score.0.weight": (HIDDEN, c, 1, 1),
            a + "score.0.bias": (HIDDEN,),
            a + "score.3.weight": (NUM_CLUSTERS, HIDDEN, 1, 1),
            a + "score.3.bias": (NUM_CLUSTERS,),
            # ConvTranspose2d weights are (in, out, k, k).
            "upconv.weight": (c, UPCONV_DIM, 3, 3),
            "upconv.bias": (UPCONV_DIM,),
            "upconv2.weight": (UPCONV_DIM, TOKEN_DIM, 3, 3),
            "upconv2.bias": (TOKEN_DIM,),
        }
    )
    return shapes


_BLOCK = re.compile(r"^backbone\.model\.blocks\.(\d+)\.")


def detect_arch(shapes: Mapping[str, Sequence[int]]) -> ArchSpec:
    """Name the architecture whose geometry these (prefix-free) parameter shapes have."""
    key = "backbone.model.patch_embed.proj.weight"
    if key not in shapes:
        sample = ", ".join(sorted(shapes)[:5]) or "no keys at all"
        raise CheckpointError(
            f"not an FoL checkpoint: no {key!r} (found {sample}, ...); "
            "expected the published FoL layout (backbone.model.*, aggregator.*, upconv*)"
        )
    width = int(shapes[key][0])
    blocks = {int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))}
    depth = max(blocks) + 1 if blocks else 0
    swiglu = any(".mlp.w12." in k for k in shapes)
    for spec in ARCHS.values():
        if (spec.width, spec.depth, spec.ffn == "swiglu") == (width, depth, swiglu):
            return spec
    known = "; ".join(f"{s.name}: width {s.width}, depth {s.depth}" for s in ARCHS.values())
    raise CheckpointError(
        f"checkpoint backbone has width {width} and depth {depth}"
        f"{' (SwiGLU)' if swiglu else ''}, which matches no supported architecture ({known})"
    )
