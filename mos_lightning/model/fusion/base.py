"""What every fusion strategy provides to the one generation block, and the parts they share."""
from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import ConfigError
from ...types import Conditioning, TowerGeometry, TowerStates


class Fusion(nn.Module):
    """Turns the understanding tower's states into per-block conditioning for the generation tower.

    Subclasses take the towers' `TowerGeometry` as their first argument; everything else is
    their own configuration, set in YAML under `fusion.init_args`.
    """

    reads_keys_values = False  # True: the understanding tower also returns each layer's own K/V

    def __init__(self, geometry: TowerGeometry):
        super().__init__()
        self.geometry = geometry

    def forward(self, states: TowerStates, latent: torch.Tensor, t: torch.Tensor) -> Conditioning:
        """states: frozen tower output; latent: (B, N, D_g) patchified z_t; t: (B,)."""
        raise NotImplementedError

    def compiled_regions(self) -> list[nn.Module]:
        """Modules that `model.compile` compiles on their own (TextToImage.compile_regions); none by default."""
        return []


class LayerProjections(nn.Module):
    """Proj_j (§3.3): one linear map D_u -> D_g per generation layer j."""

    def __init__(self, layers: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(layers, d_in, d_out))
        self.bias = nn.Parameter(torch.empty(layers, d_out))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.normal_().div_(math.sqrt(self.weight.shape[1]))
        self.bias.zero_()

    def forward(self, mixed: torch.Tensor) -> torch.Tensor:
        """(B, n, L, D_u) -> (B, n, L, D_g), contiguous: einsum's output layout varies with the mode, and each
        layout of block j's context would be a compiled graph of its own under `model.compile`."""
        out = torch.einsum("bnld,nde->bnle", mixed.to(self.weight.dtype), self.weight) + self.bias[None, :, None]
        return out.contiguous()


def understanding_layer(index: int, geometry: TowerGeometry, setting: str) -> int:
    """A single understanding-layer index (negative counts from the end), checked against m."""
    m = geometry.understanding_layers
    if not -m <= index < m:
        raise ConfigError(f"{setting}={index} is out of range: allowed {-m}..{m - 1} (m = {m} understanding states)")
    return index % m
