"""Self-attention fusion (Fig. 2b; MMDiT / Flux style): prompt tokens join the carried stream.

Final-layer features are projected once and concatenated with the image tokens at the input;
both are updated by every block. The text stream shares the block's weights (single-stream,
as Flux's single blocks), rather than MMDiT's separate per-modality weights: the house keeps one
block class, and the parameter count then matches the in-context strategies.
"""
from __future__ import annotations

import torch
from torch import nn

from ...types import Conditioning, TowerGeometry, TowerStates
from .base import Fusion, understanding_layer


class SelfAttentionFusion(Fusion):
    """Args: layer: which understanding state feeds the stream (-1: the last layer)."""

    def __init__(self, geometry: TowerGeometry, layer: int = -1):
        super().__init__(geometry)
        self.layer = understanding_layer(layer, geometry, "fusion.layer")
        self.proj = nn.Linear(geometry.understanding_width, geometry.generation_width)

    def forward(self, states: TowerStates, latent: torch.Tensor, t: torch.Tensor) -> Conditioning:
        stream = self.proj(states.hidden[:, self.layer].to(self.proj.weight.dtype))  # (B, L, D_g)
        return Conditioning(states.mask, stream=stream)
