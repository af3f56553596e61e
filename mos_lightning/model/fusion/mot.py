"""Mixture-of-Transformers fusion (Fig. 6; LMFusion / Bagel / Playground v3 style).

Generation block j attends to the keys and values of understanding layer j, taken from the
frozen tower's own attention: a rigid one-to-one layer correspondence, so it needs as many
tower layers as generation blocks and the same head geometry. No trainable parameters of its
own; the block's key RMSNorm (QK-norm) puts the tower's keys on the generation tower's scale.
"""
from __future__ import annotations

import torch
from einops import rearrange

from ...errors import ConfigError
from ...types import Conditioning, TowerGeometry, TowerStates
from .base import Fusion


class MoTFusion(Fusion):
    reads_keys_values = True

    def __init__(self, geometry: TowerGeometry):
        super().__init__(geometry)
        g = geometry
        if g.understanding_layers - 1 != g.generation_layers:
            raise ConfigError(f"MoT needs one understanding layer per generation block: the tower has "
                              f"{g.understanding_layers - 1} layers, model.generation.depth={g.generation_layers}")
        head_dim = g.generation_width // max(g.generation_heads, 1)
        if (g.understanding_kv_heads, g.understanding_head_dim) != (g.generation_heads, head_dim):
            raise ConfigError(f"MoT needs the same head geometry in both towers: the tower's keys/values have "
                              f"{g.understanding_kv_heads} heads x {g.understanding_head_dim}, model.generation has "
                              f"heads={g.generation_heads} x {head_dim} (width {g.generation_width})")

    def forward(self, states: TowerStates, latent: torch.Tensor, t: torch.Tensor) -> Conditioning:
        kv = rearrange(states.keys_values, "b n two l (h d) -> b n two h l d", h=self.geometry.generation_heads)
        return Conditioning(states.mask, context_kv=kv)
