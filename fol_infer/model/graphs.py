"""The two exportable branches of an FoL model at one fixed resolution (torch)."""

from __future__ import annotations

import torch
from torch import nn

from fol_infer.model.fol import FoLModel

GLOBAL_INPUTS = ("image",)
GLOBAL_OUTPUTS = ("global", "features", "confidence")
LOCAL_INPUTS = ("features", "confidence")
LOCAL_OUTPUTS = ("tokens", "count", "region_mask")


class GlobalGraph(nn.Module):
    """image -> (global, features, confidence), with the position embedding baked in.

    Baking it as a constant removes DINOv2's bicubic interpolation from the graph: TensorRT
    has no bicubic Resize, and the values are fixed for a fixed resolution anyway.
    """

    pos_embed: torch.Tensor

    def __init__(self, model: FoLModel, resolution: tuple[int, int]) -> None:
        super().__init__()
        self.model = model
        h, w = resolution[0] // 14, resolution[1] // 14
        self.register_buffer("pos_embed", model.backbone.model.position_embedding(h, w).clone())

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.forward_global(image, self.pos_embed)


class LocalGraph(nn.Module):
    """(features, confidence) -> (tokens, count, region_mask)."""

    def __init__(self, model: FoLModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, features: torch.Tensor, confidence: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.forward_local(features, confidence)
