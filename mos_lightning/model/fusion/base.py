"""What every fusion strategy provides to the one generation block."""
from __future__ import annotations

import torch
from torch import nn

from ...types import Conditioning, TowerGeometry, TowerStates


class Fusion(nn.Module):
    """Turns the understanding tower's states into per-block conditioning for the generation tower.

    Subclasses take the towers' `TowerGeometry` as their first argument; everything else is
    their own configuration, set in YAML under `fusion.init_args`.
    """

    def __init__(self, geometry: TowerGeometry):
        super().__init__()
        self.geometry = geometry

    def forward(self, states: TowerStates, latent: torch.Tensor, t: torch.Tensor) -> Conditioning:
        """states: frozen tower output; latent: (B, N, D_g) patchified z_t; t: (B,)."""
        raise NotImplementedError
