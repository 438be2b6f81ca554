"""The FoL model at inference time: aggregator (global descriptor) and local head (tokens).

Written as two branches with static output shapes so that each exports to one ONNX graph:
- global: image -> descriptor (B, 8448), backbone features (B, C, h, w), confidence (B, h, w)
- local: features + confidence -> tokens (B, 3600, 128), count (B,), region mask (B, h, w)
A query answered from the global descriptor alone never runs the local branch.
Every step follows ``shared/spec/fol-inference.md`` sections 3-6.

The 225 regions are the TopK of the softmax confidence, exactly as published. That map is
nearly flat (its logits lie in [0, 1/64]), so float32 rounding can leave exact ties at the
225th place; torch.topk breaks them in an unspecified order, ONNX Runtime and TensorRT by
lowest index, so backends can differ on such images (measured in benchmarks/export_parity.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fol_infer.model.arch import (
    CLUSTER_DIM,
    HIDDEN,
    MAX_TOKENS,
    NUM_CLUSTERS,
    REGION_PATCHES,
    SCENE_TOKEN_DIM,
    TOKEN_DIM,
    UPCONV_DIM,
    ArchSpec,
)
from fol_infer.model.dinov2 import DinoV2

SALIENCY_FLOOR = 0.01  # mask_guide keeps saliency >= this
SINKHORN_ITERS = 3
CLAMPED_TOP = 3  # the 3 largest confidences are clamped ...
CLAMP_QUANTILE = 0.05  # ... to the value at int(0.05 * n) in descending order
L2_EPS = 1e-12  # torch.nn.functional.normalize's default: zero rows stay zero


class Backbone(nn.Module):
    """Keeps the published ``backbone.model.*`` key prefix."""

    def __init__(self, arch: ArchSpec) -> None:
        super().__init__()
        self.model = DinoV2(arch)


def logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Max-shifted logsumexp: exports to plain ops that stay finite in any precision."""
    peak = x.amax(dim=dim, keepdim=True)
    return (peak + torch.log(torch.exp(x - peak).sum(dim=dim, keepdim=True))).squeeze(dim)


def sinkhorn_assignment(scores: torch.Tensor, dustbin: torch.Tensor) -> torch.Tensor:
    """Log-space optimal transport with a dustbin row (SuperGlue style), dustbin dropped.

    scores (B, m, n), dustbin (B, n) -> assignment p (B, m, n).
    """
    _, m, n = scores.shape
    z = torch.cat([scores, dustbin.unsqueeze(1)], dim=1)
    norm = -math.log(m + n)
    log_mu = torch.full((m + 1,), norm, dtype=z.dtype, device=z.device)
    log_mu[-1] = math.log(n - m) + norm
    log_nu = torch.full((n,), norm, dtype=z.dtype, device=z.device)
    u = torch.zeros_like(z[:, :, 0])
    v = torch.zeros_like(z[:, 0, :])
    for _ in range(SINKHORN_ITERS):
        u = log_mu - logsumexp(z + v.unsqueeze(1), dim=2)
        v = log_nu - logsumexp(z + u.unsqueeze(2), dim=1)
    return torch.exp(z + u.unsqueeze(2) + v.unsqueeze(1) - norm)[:, :-1]


def clamp_top_values(x: torch.Tensor) -> torch.Tensor:
    """Clamp each row's 3 largest values to its value at rank int(0.05 * n) (descending)."""
    rank = int(CLAMP_QUANTILE * x.shape[1])
    values, indices = torch.topk(x, rank + 1, dim=1)
    fill = values[:, rank : rank + 1].expand(-1, CLAMPED_TOP)
    return x.scatter(1, indices[:, :CLAMPED_TOP], fill)


class Aggregator(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.token_features = nn.Sequential(
            nn.Linear(width, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, SCENE_TOKEN_DIM)
        )
        self.cluster_features = nn.Sequential(
            nn.Conv2d(width, HIDDEN, 1),
            nn.Dropout(0.3),
            nn.ReLU(),
            nn.Conv2d(HIDDEN, CLUSTER_DIM, 1),
        )
        self.score = nn.Sequential(
            nn.Conv2d(width, HIDDEN, 1),
            nn.Dropout(0.3),
            nn.ReLU(),
            nn.Conv2d(HIDDEN, NUM_CLUSTERS, 1),
        )

    def forward(
        self, x: torch.Tensor, cls: torch.Tensor, saliency: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B,C,h,w), cls (B,C), saliency (B,n) -> descriptor (B,8448), confidence (B,n)."""
        f = self.cluster_features(x).flatten(2)  # (B, 128, n)
        s = self.score(x).flatten(2)  # (B, 64, n)
        g = self.token_features(cls)  # (B, 256)
        mask_guide = torch.where(saliency >= SALIENCY_FLOOR, saliency, torch.zeros_like(saliency))
        p = sinkhorn_assignment(s, 1.0 - mask_guide)  # (B, 64, n)
        clusters = F.normalize(torch.bmm(f, p.transpose(1, 2)), dim=1, eps=L2_EPS)  # (B,128,64)
        descriptor = torch.cat([F.normalize(g, dim=-1, eps=L2_EPS), clusters.flatten(1)], dim=-1)
        confidence = torch.softmax(clamp_top_values(p.mean(dim=1)), dim=-1)
        return F.normalize(descriptor, dim=-1, eps=L2_EPS), confidence


def upsampled_grid(h: int, w: int) -> tuple[int, int]:
    """Output size of the two stride-2 transposed convolutions: 4h - 3 (23 -> 89)."""
    return 4 * h - 3, 4 * w - 3


class FoLModel(nn.Module):
    """Parameter names match the published checkpoints (after stripping ``module.``)."""

    def __init__(self, arch: ArchSpec) -> None:
        super().__init__()
        self.arch = arch
        self.backbone = Backbone(arch)
        self.aggregator = Aggregator(arch.width)
        self.upconv = nn.ConvTranspose2d(arch.width, UPCONV_DIM, kernel_size=3, stride=2, padding=1)
        self.upconv2 = nn.ConvTranspose2d(UPCONV_DIM, TOKEN_DIM, kernel_size=3, stride=2, padding=1)

    def forward_global(
        self, images: torch.Tensor, pos_embed: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> descriptor (B,8448), features (B,C,h,w), confidence (B,h,w)."""
        b, _, height, width = images.shape
        h, w = height // 14, width // 14
        patches, cls, saliency = self.backbone.model(images, pos_embed)
        x = patches.transpose(1, 2).reshape(b, -1, h, w)
        descriptor, confidence = self.aggregator(x, cls, saliency)
        return descriptor, x, confidence.reshape(b, h, w)

    def forward_local(
        self, features: torch.Tensor, confidence: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> tokens (B,3600,128), count (B,) int32, region mask (B,h,w) bool.

        Static shapes, no NonZero: the selected positions of the upsampled grid come from a
        TopK over ``selected * (cells - position)``, which lists them in row-major order
        first; rows past the count are zeroed.
        """
        b, _, h, w = features.shape
        big_h, big_w = upsampled_grid(h, w)
        cells = big_h * big_w
        y = self.upconv2(F.relu(self.upconv(features)))  # (B, 128, H', W')

        top = torch.topk(confidence.reshape(b, h * w), REGION_PATCHES, dim=1).indices
        region = torch.zeros(b, h * w, dtype=features.dtype, device=features.device)
        region = region.scatter(1, top, torch.ones_like(top, dtype=features.dtype))

        # Nearest upsampling of the region mask (PyTorch 'nearest': src = floor(dst * h / H')).
        rows = torch.div(torch.arange(big_h) * h, big_h, rounding_mode="floor")
        cols = torch.div(torch.arange(big_w) * w, big_w, rounding_mode="floor")
        source = (rows[:, None] * w + cols[None, :]).reshape(-1).to(features.device)
        selected = region.index_select(1, source)  # (B, cells), 0/1

        k = min(MAX_TOKENS, cells)
        order = torch.arange(cells, 0, -1, dtype=features.dtype, device=features.device)
        positions = torch.topk(selected * order, k, dim=1).indices  # selected first, ascending
        flat = y.flatten(2).transpose(1, 2)  # (B, cells, 128)
        tokens = torch.gather(flat, 1, positions.unsqueeze(-1).expand(-1, -1, TOKEN_DIM))
        valid = torch.gather(selected, 1, positions).unsqueeze(-1)
        tokens = F.normalize(tokens * valid, dim=-1, eps=L2_EPS)
        if k < MAX_TOKENS:
            tokens = F.pad(tokens, (0, 0, 0, MAX_TOKENS - k))
        count = selected.sum(dim=1).to(torch.int32)
        return tokens, count, region.reshape(b, h, w) > 0.5
