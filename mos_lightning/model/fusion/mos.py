"""Mixture of States fusion (§3.2-3.3): router -> Eq. 3 -> eps-greedy top-k -> Eq. 4 -> Proj_j."""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
from einops import rearrange

from ...errors import ConfigError
from ...types import Conditioning, Routing, TowerGeometry, TowerStates
from ..router import ROUTER_INPUTS, MoSRouter, SampleWiseRouter, aggregate, routing_weights, select_top_k
from .base import Fusion, LayerProjections


class MoSFusion(Fusion):
    """The learned router and the per-generation-layer projections Proj_j.

    Args:
        inputs: what the router sees (Table 1): a list from ("prompt", "latent", "timestep").
        top_k: understanding layers summed per generation layer (App. A: 2).
        epsilon: eps-greedy exploration probability in training (App. A: 0.05); eval uses 0.
        renormalize: rescale the selected weights to sum to one (not the paper's default).
        router_width, router_depth, router_heads: size of the lightweight router transformer. Two heads of 32 at
            width 64: the softmax dominates the router's own cost, and fewer heads halve it (docs/performance.md).
        modality_norms: one RMSNorm per router input (App. B.2) rather than one shared.
        router_ffn_multiple: the router blocks' FFN hidden width rounded up to a multiple of this (as the
            generation tower's ffn_multiple).
    """

    router_class = MoSRouter

    def __init__(self, geometry: TowerGeometry, inputs: Sequence[str] = ROUTER_INPUTS, top_k: int = 2,
                 epsilon: float = 0.05, renormalize: bool = False, router_width: int = 64,
                 router_depth: int = 2, router_heads: int = 2, modality_norms: bool = True,
                 router_ffn_multiple: int = 1):
        super().__init__(geometry)
        m, n = self.routed_layers(geometry), geometry.generation_layers
        if not 1 <= top_k <= m:
            raise ConfigError(f"fusion.top_k={top_k} is out of range: allowed 1..{m} "
                              "(m, the understanding tower's states)")
        if not 0.0 <= epsilon <= 1.0:
            raise ConfigError(f"fusion.epsilon={epsilon} is out of range: allowed [0, 1]")
        self.top_k, self.epsilon, self.renormalize = top_k, epsilon, renormalize
        routed = replace(geometry, understanding_layers=m)
        self.router = self.router_class(routed, inputs, router_width, router_depth, router_heads, modality_norms,
                                        router_ffn_multiple)
        self.proj = LayerProjections(n, *self.projection_widths(geometry))

    def routed_layers(self, geometry: TowerGeometry) -> int:
        """m: how many understanding states the router chooses among."""
        return geometry.understanding_layers

    def projection_widths(self, geometry: TowerGeometry) -> tuple[int, int]:
        return geometry.understanding_width, geometry.generation_width

    def compiled_regions(self) -> list[torch.nn.Module]:
        """The router's blocks, not the whole router: a block's graph is the same whatever the router sees (only
        its sequence length differs, and that is dynamic), so every arm of Table 1 reuses one cold compile."""
        return list(self.router.blocks)

    def route(self, states: TowerStates, latent: torch.Tensor, t: torch.Tensor) -> Routing:
        logits = self.router(states, latent, t)  # (B, L, m, n)
        weights = routing_weights(logits)
        epsilon = self.epsilon if self.training else 0.0  # exploration is for training only
        return Routing(logits, weights, select_top_k(weights, self.top_k, epsilon), states.mask)

    def forward(self, states: TowerStates, latent: torch.Tensor, t: torch.Tensor) -> Conditioning:
        routing = self.route(states, latent, t)
        mixed = aggregate(states.hidden, routing.weights, routing.selected, self.renormalize)  # (B, n, L, D_u)
        return Conditioning(states.mask, context=self.proj(mixed), routing=routing)


class SampleWiseMoSFusion(MoSFusion):
    """MoS whose router predicts one routing matrix per prompt from a [CLS] token (Table 2, Fig. 5a)."""

    router_class = SampleWiseRouter


class KeyValueMoSFusion(MoSFusion):
    """MoS routing in the keys/values space (App. B.1, Fig. 9a-b): the router mixes each tower
    layer's own attention K and V (m - 1 layers; the embeddings have none), and Proj_j maps them
    to block j's keys and values, which the block then attends to directly."""

    reads_keys_values = True

    def routed_layers(self, geometry: TowerGeometry) -> int:
        return geometry.understanding_layers - 1

    def projection_widths(self, geometry: TowerGeometry) -> tuple[int, int]:
        kv_width = geometry.understanding_kv_heads * geometry.understanding_head_dim
        return 2 * kv_width, 2 * geometry.generation_width

    def forward(self, states: TowerStates, latent: torch.Tensor, t: torch.Tensor) -> Conditioning:
        routing = self.route(states, latent, t)
        kv = rearrange(states.keys_values, "b m two l d -> b m l (two d)")  # (B, m - 1, L, 2 D_kv)
        mixed = self.proj(aggregate(kv, routing.weights, routing.selected, self.renormalize))  # (B, n, L, 2 D_g)
        heads = self.geometry.generation_heads
        context_kv = rearrange(mixed, "b n l (two h d) -> b n two h l d", two=2, h=heads)
        return Conditioning(states.mask, context_kv=context_kv, routing=routing)
