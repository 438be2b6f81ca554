"""DINOv2 ViT/14 with the torch-hub parameter names, inference only.

Only what FoL needs at test time: the final-norm patch features, the CLS token, and the CLS
attention row of the last block (the saliency that guides the aggregator's dustbin).
Attention is written out (no SDPA) so the exported graph is plain MatMul/Softmax, which
TensorRT's precision constraints can pin to fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fol_infer.model.arch import PATCH_SIZE, POS_GRID, ArchSpec

LAYER_NORM_EPS = 1e-6
POS_INTERPOLATE_OFFSET = 0.1  # DINOv2's historical offset, part of its interpolation rule


class PatchEmbed(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class LayerScale(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """ViT-G's feed-forward: w3(silu(a) * b) with [a, b] = w12(x)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(width, 2 * hidden)
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (width // heads) ** -0.5
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the attention output and the CLS row of the attention probabilities."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out), attn[:, :, 0, :]


class Block(nn.Module):
    def __init__(self, arch: ArchSpec) -> None:
        super().__init__()
        c = arch.width
        self.norm1 = nn.LayerNorm(c, eps=LAYER_NORM_EPS)
        self.attn = Attention(c, arch.heads)
        self.ls1 = LayerScale(c)
        self.norm2 = nn.LayerNorm(c, eps=LAYER_NORM_EPS)
        self.mlp: nn.Module = (
            SwiGLU(c, arch.mlp_hidden) if arch.ffn == "swiglu" else Mlp(c, arch.mlp_hidden)
        )
        self.ls2 = LayerScale(c)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn_out, cls_attn = self.attn(self.norm1(x))
        x = x + self.ls1(attn_out)
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x, cls_attn


class DinoV2(nn.Module):
    """The backbone. `forward` takes the position embedding already sized for the input."""

    def __init__(self, arch: ArchSpec) -> None:
        super().__init__()
        c = arch.width
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.pos_embed = nn.Parameter(torch.zeros(1, POS_GRID * POS_GRID + 1, c))
        self.mask_token = nn.Parameter(torch.zeros(1, c))  # training only; kept for the layout
        self.patch_embed = PatchEmbed(c)
        self.blocks = nn.ModuleList(Block(arch) for _ in range(arch.depth))
        self.norm = nn.LayerNorm(c, eps=LAYER_NORM_EPS)

    @torch.no_grad()
    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """(1, 1 + h*w, C) for an h x w patch grid, by DINOv2's exact rule.

        DINOv2 passes a scale factor of (h + 0.1) / 37 rather than an output size, so PyTorch
        maps coordinates with that factor; a size-based call would give other values. At a
        fixed resolution this is a constant, which export bakes into the graph.
        """
        pos = self.pos_embed.float()
        if h == w == POS_GRID:
            return pos
        c = pos.shape[-1]
        grid = pos[:, 1:].reshape(1, POS_GRID, POS_GRID, c).permute(0, 3, 1, 2)
        grid = F.interpolate(
            grid,
            mode="bicubic",
            antialias=False,
            scale_factor=(
                (h + POS_INTERPOLATE_OFFSET) / POS_GRID,
                (w + POS_INTERPOLATE_OFFSET) / POS_GRID,
            ),
        )
        if grid.shape[-2:] != (h, w):  # pragma: no cover - guards the offset rule itself
            raise AssertionError(f"position grid {tuple(grid.shape[-2:])} != {(h, w)}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, c)
        return torch.cat([pos[:, :1], grid], dim=1)

    def forward(
        self, images: torch.Tensor, pos_embed: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images (B,3,H,W) -> patch features (B,n,C), CLS (B,C), saliency (B,n).

        The saliency is the last block's CLS-to-patch attention summed over heads.
        """
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos_embed
        cls_attn = x.new_zeros(())
        for block in self.blocks:
            x, cls_attn = block(x)
        x = self.norm(x)
        saliency = cls_attn[:, :, 1:].sum(dim=1)
        return x[:, 1:], x[:, 0], saliency
