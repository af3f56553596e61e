"""Hand-crafted routing (Table 3): fixed connections that evenly skip understanding layers."""
from __future__ import annotations

from typing import Sequence

import torch

from ...errors import ConfigError
from ...types import Conditioning, Routing, TowerGeometry, TowerStates
from .base import Fusion, LayerProjections


def evenly_spaced(m: int, n: int) -> list[int]:
    """Generation layer j takes understanding state round(j (m - 1) / (n - 1)): first to last."""
    return [m - 1] if n == 1 else [round(j * (m - 1) / (n - 1)) for j in range(n)]


class HandCraftedFusion(Fusion):
    """Same in-context concatenation and Proj_j as MoS, but the layer for each block is fixed.

    Args:
        layers: understanding-state index for each of the n generation layers; None spaces them
            evenly from the embeddings to the last layer.
    """

    def __init__(self, geometry: TowerGeometry, layers: Sequence[int] | None = None):
        super().__init__(geometry)
        m, n = geometry.understanding_layers, geometry.generation_layers
        layers = evenly_spaced(m, n) if layers is None else list(layers)
        if len(layers) != n or not all(0 <= i < m for i in layers):
            raise ConfigError(f"fusion.layers={layers}: need {n} indices (one per generation layer), "
                              f"each in 0..{m - 1}")
        self.layer_indices = layers
        self.register_buffer("layers", torch.tensor(layers), persistent=False)
        self.proj = LayerProjections(n, geometry.understanding_width, geometry.generation_width)

    def reset_parameters(self) -> None:
        """Refill the fixed indices (a buffer left uninitialised by materialising from the meta device)."""
        self.layers.copy_(torch.tensor(self.layer_indices))

    def one_hot(self, states: TowerStates) -> torch.Tensor:
        """The fixed routing as an (B, L, m, n) matrix, for visualisation and cross-checks."""
        m, n = self.geometry.understanding_layers, self.geometry.generation_layers
        eye = torch.zeros(m, n, device=self.layers.device)
        eye[self.layers, torch.arange(n, device=eye.device)] = 1.0
        return eye.expand(*states.mask.shape, m, n)

    def forward(self, states: TowerStates, latent: torch.Tensor, t: torch.Tensor) -> Conditioning:
        mixed = states.hidden[:, self.layers]  # (B, n, L, D_u)
        weights = self.one_hot(states)
        routing = Routing(logits=weights, weights=weights, selected=weights.bool(), mask=states.mask)
        return Conditioning(states.mask, context=self.proj(mixed), routing=routing)
