"""Small dataclasses handed between stages (DESIGN.md §1).

Data flows one way: Batch -> TowerStates -> Routing -> velocity.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch


@dataclass
class Batch:
    """What a DataModule yields: pixels in [-1, 1] and the captions that describe them."""

    images: torch.Tensor  # (B, C, H, W)
    captions: list[str]
    categories: list[str] = field(default_factory=list)

    def to(self, device) -> "Batch":
        return Batch(self.images.to(device), self.captions, self.categories)

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class TowerStates:
    """All m hidden states of the frozen understanding tower (Eq. 2)."""

    hidden: torch.Tensor  # (B, m, L, D_u): embeddings output + every layer
    mask: torch.Tensor  # (B, L) bool, True where a real token is
    keys_values: torch.Tensor | None = None  # (B, m - 1, 2, L, D_kv): each layer's own attention K, V

    @property
    def prompt(self) -> torch.Tensor:
        """The tower's input embeddings (state 0), which the router reads as 'prompt'."""
        return self.hidden[:, 0]  # (B, L, D_u)

    @property
    def num_layers(self) -> int:
        return self.hidden.shape[1]

    def to(self, device) -> TowerStates:
        kv = None if self.keys_values is None else self.keys_values.to(device)
        return TowerStates(self.hidden.to(device), self.mask.to(device), kv)


@dataclass
class Routing:
    """What the MoS router decided (Eq. 3-4); callbacks and notebooks read it."""

    logits: torch.Tensor  # (B, L, m, n) raw affinities w_ij per context token
    weights: torch.Tensor  # (B, L, m, n) softmax over m (Eq. 3)
    selected: torch.Tensor  # (B, L, m, n) bool, the top-k_eps set I_j
    mask: torch.Tensor  # (B, L) bool, real context tokens

    def layer_contribution(self) -> torch.Tensor:
        """Average weight of each understanding layer, over generation layers and real tokens."""
        w = (self.weights * self.selected).float().mean(-1)  # (B, L, m)
        m = self.mask.float().unsqueeze(-1)
        return (w * m).sum(1) / m.sum(1).clamp_min(1)  # (B, m)


@dataclass(frozen=True)
class TowerGeometry:
    """What a fusion strategy needs to know about the two towers; read off the built towers."""

    understanding_layers: int  # m
    understanding_width: int  # D_u
    generation_layers: int  # n
    generation_width: int  # D_g
    understanding_kv_heads: int = 0  # heads of the tower's own keys/values (MoT, K/V routing)
    understanding_head_dim: int = 0
    generation_heads: int = 0


@dataclass
class Conditioning:
    """A fusion strategy's answer, in the forms the one generation block understands.

    In-context fusion (MoS, hand-crafted) fills `context`: block j attends to context[:, j] as
    extra keys/values. Self-attention fusion fills `stream`: tokens carried with the image stream
    through every block. Cross-attention fusion fills `cross`: one residual sub-layer per block,
    applied between the block's attention and its FFN.
    """

    mask: torch.Tensor  # (B, L) bool, real context tokens
    context: torch.Tensor | None = None  # (B, n, L, D_g)
    routing: Routing | None = None
    stream: torch.Tensor | None = None  # (B, L, D_g)
    context_kv: torch.Tensor | None = None  # (B, n, 2, H, L, d): ready keys/values per block (MoT)
    cross: Sequence[Callable[[torch.Tensor], torch.Tensor]] | None = None  # n callables (B, N, D_g) -> same

    def block_inputs(self, j: int) -> dict:
        """Keyword arguments for generation block j."""
        in_context = self.context is not None or self.context_kv is not None
        return {"context": None if self.context is None else self.context[:, j],
                "context_kv": None if self.context_kv is None else self.context_kv[:, j].unbind(1),
                "context_mask": self.mask if in_context else None,
                "cross": None if self.cross is None else self.cross[j]}
