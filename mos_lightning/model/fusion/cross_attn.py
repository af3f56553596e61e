"""Cross-attention fusion (Table 4; PixArt / SANA style): one fixed layer, attended in every block."""
from __future__ import annotations

from functools import partial

import torch
from einops import rearrange
from torch import nn

from ...types import Conditioning, TowerGeometry, TowerStates
from ..blocks import attention
from .base import Fusion, understanding_layer


class CrossAttention(nn.Module):
    """Image queries attend to the prompt tokens; QK-norm as in the generation block."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.RMSNorm(dim)
        self.q, self.kv = nn.Linear(dim, dim, bias=False), nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)
        self.q_norm, self.k_norm = nn.RMSNorm(dim // heads), nn.RMSNorm(dim // heads)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D), context: (B, L, D), mask: (B, L) -> residual update (B, N, D)."""
        q = self.q_norm(rearrange(self.q(self.norm(x)), "b n (h d) -> b h n d", h=self.heads))
        k, v = rearrange(self.kv(context), "b l (two h d) -> two b h l d", two=2, h=self.heads)
        attn = attention(q, self.k_norm(k), v, mask[:, None, None, :])
        return self.out(rearrange(attn, "b h n d -> b n (h d)"))


class CrossAttentionFusion(Fusion):
    """Features of one understanding layer (the final one by default), projected once.

    Args:
        layer: which understanding state (negative counts from the end; -1 is the last layer).
        heads: cross-attention heads (default: one per 32 channels of the generation width).
    """

    def __init__(self, geometry: TowerGeometry, layer: int = -1, heads: int | None = None):
        super().__init__(geometry)
        self.layer = understanding_layer(layer, geometry, "fusion.layer")
        width = geometry.generation_width
        self.proj = nn.Linear(geometry.understanding_width, width)
        heads = heads or max(width // 32, 1)
        self.cross = nn.ModuleList(CrossAttention(width, heads) for _ in range(geometry.generation_layers))

    def forward(self, states: TowerStates, latent: torch.Tensor, t: torch.Tensor) -> Conditioning:
        context = self.proj(states.hidden[:, self.layer].to(self.proj.weight.dtype))  # (B, L, D_g)
        cross = [partial(layer, context=context, mask=states.mask) for layer in self.cross]
        return Conditioning(states.mask, cross=cross)
