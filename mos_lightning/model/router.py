"""The MoS router R (§3.2-3.3, Eq. 3-4, App. A, App. B.2).

Inputs (each tokenised, given its own RMSNorm, then concatenated): the prompt (the tower's input
embeddings through a linear), the noisy latent (the generation tower's own patchify, then a
linear) and the timestep (sinusoidal, then an MLP). Two bidirectional transformer blocks; a
linear head maps every context token to an m x n logit matrix (token-wise prediction). The blocks are
the house `Block` (pre-norm, QK-norm, SwiGLU) with self-attention only: no context, no positions.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..types import TowerGeometry, TowerStates
from .blocks import Block
from .embeddings import TimestepEmbedding

ROUTER_INPUTS = ("prompt", "latent", "timestep")


def routing_weights(logits: torch.Tensor) -> torch.Tensor:
    """Eq. 3: softmax over the m understanding layers, independently for each generation layer j."""
    return torch.softmax(logits.float(), dim=-2)  # (B, L, m, n)


def select_top_k(weights: torch.Tensor, top_k: int, epsilon: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The eps-greedy top-k set I_j (§3.2) for every (sample, token, generation layer).

    With probability epsilon a decision takes k layers uniformly at random instead of the k
    largest weights. Returns a bool mask (B, L, m, n).
    """
    dim = -2
    greedy = _k_hot(weights.topk(top_k, dim=dim).indices, weights, dim)
    if epsilon <= 0:
        return greedy
    noise = torch.rand(weights.shape, device=weights.device, generator=generator)
    random = _k_hot(noise.topk(top_k, dim=dim).indices, weights, dim)
    explore = torch.rand(greedy.select(dim, 0).shape, device=weights.device, generator=generator) < epsilon
    return torch.where(explore.unsqueeze(dim), random, greedy)


def _k_hot(indices: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.zeros_like(like, dtype=torch.bool).scatter(dim, indices, True)


def aggregate(hidden: torch.Tensor, weights: torch.Tensor, selected: torch.Tensor,
              renormalize: bool = False) -> torch.Tensor:
    """Eq. 4: S_j = sum_{i in I_j} wbar_ij S_i, per context token. Returns (B, n, L, D_u).

    The paper's form keeps the Eq. 3 weights as they are (they need not sum to one over I_j);
    `renormalize` is the variant that rescales them over the k selected layers.
    """
    w = weights * selected  # (B, L, m, n)
    if renormalize:
        w = w / w.sum(dim=-2, keepdim=True).clamp_min(1e-12)
    return torch.einsum("blmn,bmld->bnld", w.to(hidden.dtype), hidden)


class MoSRouter(nn.Module):
    """Predicts, for every context token, the m x n routing logits W (token-wise, §3.2)."""

    def __init__(self, geometry: TowerGeometry, inputs: Sequence[str] = ROUTER_INPUTS, width: int = 64,
                 depth: int = 2, heads: int = 2, modality_norms: bool = True, ffn_multiple: int = 1):
        super().__init__()
        check_router_inputs(inputs)
        self.inputs = tuple(inputs)
        self.m, self.n = geometry.understanding_layers, geometry.generation_layers
        self.prompt = nn.Linear(geometry.understanding_width, width)
        shared = nn.RMSNorm(width)  # App. B.2 compares one shared norm with one per modality
        self.norms = nn.ModuleDict({name: nn.RMSNorm(width) if modality_norms else shared for name in self.inputs})
        self.latent = nn.Linear(geometry.generation_width, width) if "latent" in self.inputs else None
        self.timestep = TimestepEmbedding(width) if "timestep" in self.inputs else None
        self.blocks = nn.ModuleList(Block(width, heads, context=False, ffn_multiple=ffn_multiple)
                                    for _ in range(depth))  # bidirectional
        self.norm_out = nn.RMSNorm(width)
        self.head = nn.Linear(width, self.m * self.n)

    def tokens(self, states: TowerStates, latent: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's input sequence (B, L [+N] [+1], W) and its key-padding mask (True = ignore)."""
        seq, keep = [self.norms["prompt"](self.prompt(states.prompt.to(self.prompt.weight.dtype)))], [states.mask]
        if self.latent is not None:
            seq.append(self.norms["latent"](self.latent(latent)))
            keep.append(torch.ones(latent.shape[:2], dtype=torch.bool, device=latent.device))
        if self.timestep is not None:
            seq.append(self.norms["timestep"](self.timestep(t))[:, None])
            keep.append(torch.ones(t.shape[0], 1, dtype=torch.bool, device=t.device))
        return torch.cat(seq, dim=1), ~torch.cat(keep, dim=1)

    def encode(self, seq: torch.Tensor, ignore: torch.Tensor) -> torch.Tensor:
        """The router's blocks over the whole sequence; padded tokens are never attended. -> (B, S, W)."""
        for block in self.blocks:
            seq = block(seq, stream_mask=~ignore)
        return self.norm_out(seq)

    def forward(self, states: TowerStates, latent: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """-> logits (B, L, m, n): each context token predicts its own matrix (token-wise, Table 2)."""
        seq, ignore = self.tokens(states, latent, t)
        h = self.encode(seq, ignore)[:, : states.mask.shape[1]]
        return self.head(h).unflatten(-1, (self.m, self.n))


class SampleWiseRouter(MoSRouter):
    """Table 2's alternative: a learnable [CLS] token predicts one m x n matrix for the whole prompt."""

    def __init__(self, geometry: TowerGeometry, *args, **kwargs):
        super().__init__(geometry, *args, **kwargs)
        self.cls = nn.Parameter(nn.init.normal_(torch.empty(self.prompt.out_features), std=0.02))

    def reset_parameters(self) -> None:
        nn.init.normal_(self.cls, std=0.02)

    def forward(self, states: TowerStates, latent: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seq, ignore = self.tokens(states, latent, t)
        cls = self.cls.to(seq.dtype).expand(seq.shape[0], 1, -1)
        keep = torch.zeros_like(ignore[:, :1])
        h = self.encode(torch.cat([cls, seq], 1), torch.cat([keep, ignore], 1))[:, 0]
        logits = self.head(h).unflatten(-1, (self.m, self.n))  # (B, m, n)
        return logits[:, None].expand(-1, states.mask.shape[1], -1, -1)  # shared by every token


def check_router_inputs(inputs: Sequence[str]) -> None:
    unknown = [name for name in inputs if name not in ROUTER_INPUTS]
    if unknown or "prompt" not in inputs or isinstance(inputs, str):
        raise ConfigError(f"router inputs: got {list(inputs) if not isinstance(inputs, str) else inputs!r}; allowed: "
                         f"a list drawn from {list(ROUTER_INPUTS)} that includes 'prompt' "
                         "(its tokens carry the routing)")
