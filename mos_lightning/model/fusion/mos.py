"""Mixture of States fusion (§3.2-3.3): router -> Eq. 3 -> eps-greedy top-k -> Eq. 4 -> Proj_j."""
from __future__ import annotations

from ...errors import ConfigError

import math
from typing import Sequence

import torch
from torch import nn

from ...types import Conditioning, Routing, TowerGeometry, TowerStates
from ..router import ROUTER_INPUTS, MoSRouter, aggregate, routing_weights, select_top_k
from .base import Fusion


class MoSFusion(Fusion):
    """The learned router and the per-generation-layer projections Proj_j.

    Args:
        inputs: what the router sees (Table 1): a list from ("prompt", "latent", "timestep").
        top_k: understanding layers summed per generation layer (App. A: 2).
        epsilon: eps-greedy exploration probability in training (App. A: 0.05); eval uses 0.
        renormalize: rescale the selected weights to sum to one (not the paper's default).
        router_width, router_depth, router_heads: size of the lightweight router transformer.
    """

    def __init__(self, geometry: TowerGeometry, inputs: Sequence[str] = ROUTER_INPUTS, top_k: int = 2,
                 epsilon: float = 0.05, renormalize: bool = False, router_width: int = 64,
                 router_depth: int = 2, router_heads: int = 4):
        super().__init__(geometry)
        m, n = geometry.understanding_layers, geometry.generation_layers
        if not 1 <= top_k <= m:
            raise ConfigError(f"fusion.top_k={top_k} is out of range: allowed 1..{m} (m, the understanding tower's states)")
        if not 0.0 <= epsilon <= 1.0:
            raise ConfigError(f"fusion.epsilon={epsilon} is out of range: allowed [0, 1]")
        self.top_k, self.epsilon, self.renormalize = top_k, epsilon, renormalize
        self.router = MoSRouter(geometry, inputs, router_width, router_depth, router_heads)
        d_u, d_g = geometry.understanding_width, geometry.generation_width
        self.proj_weight = nn.Parameter(torch.randn(n, d_u, d_g) / math.sqrt(d_u))  # Proj_j, one per block
        self.proj_bias = nn.Parameter(torch.zeros(n, d_g))

    def route(self, states: TowerStates, latent: torch.Tensor, t: torch.Tensor) -> Routing:
        logits = self.router(states, latent, t)  # (B, L, m, n)
        weights = routing_weights(logits)
        epsilon = self.epsilon if self.training else 0.0  # exploration is for training only
        return Routing(logits, weights, select_top_k(weights, self.top_k, epsilon), states.mask)

    def forward(self, states: TowerStates, latent: torch.Tensor, t: torch.Tensor) -> Conditioning:
        routing = self.route(states, latent, t)
        mixed = aggregate(states.hidden, routing.weights, routing.selected, self.renormalize)  # (B, n, L, D_u)
        w = self.proj_weight
        context = torch.einsum("bnld,nde->bnle", mixed.to(w.dtype), w) + self.proj_bias[None, :, None]
        return Conditioning(context, states.mask, routing)
