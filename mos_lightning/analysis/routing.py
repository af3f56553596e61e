"""Router-pattern statistics (App. B.7, Fig. 14): pure functions over the Routing of every sampling step.

`routings` is the list that `sampling.generate(..., routings=[])` fills: one Routing per denoising
step (the conditional branch), each holding tensors (B, L, m, n) for B prompts, L context tokens,
m understanding layers and n generation layers.

Conventions, shared by every function here:
- "over tokens" means over each prompt's real tokens (Routing.mask), then the mean over prompts,
  so every prompt weighs the same whatever its length. `sample=b` keeps prompt b only.
- "routed weight" is the Eq. 3 weight where the layer is in the top-k set I_j and 0 elsewhere,
  the quantity Eq. 4 sums (the same as Routing.layer_contribution).
- Results are float64 CPU tensors.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..types import Routing

AFFINITY_KINDS = ("weights", "routed", "logits")


def _check(routings: Sequence[Routing]) -> None:
    if not routings:
        raise ValueError("no Routing recorded: the fusion strategy does not route (only MoS returns a Routing)")


def token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, ...) values, (B, L) mask -> (B, ...): each prompt's mean over its real tokens."""
    values = values.double().cpu()
    keep = mask.cpu().double().reshape(*mask.shape, *([1] * (values.dim() - 2)))
    return (values * keep).sum(1) / keep.sum(1).clamp_min(1)


def _per_step(routings: Sequence[Routing], per_prompt: Callable[[Routing], torch.Tensor],
              sample: int | None) -> torch.Tensor:
    """Stack per_prompt(routing) (B, ...) over steps -> (S, ...): prompt `sample`, or the mean over prompts."""
    _check(routings)
    stacked = torch.stack([per_prompt(r).double().cpu() for r in routings])  # (S, B, ...)
    return stacked.mean(1) if sample is None else stacked[:, sample]


def routed(routing: Routing) -> torch.Tensor:
    """(B, L, m, n): Eq. 3 weight on the selected layers, 0 on the others (what Eq. 4 sums)."""
    return routing.weights.double() * routing.selected


# (a) ------------------------------------------------------------------------------------------------

def step_contributions(routings: Sequence[Routing], sample: int | None = None) -> torch.Tensor:
    """(S, m): each understanding layer's routed weight per step, over generation layers and tokens (Fig. 14, row 2)."""
    return _per_step(routings, Routing.layer_contribution, sample)


# (b) ------------------------------------------------------------------------------------------------

def token_routing(routings: Sequence[Routing], step: int = 0, sample: int = 0) -> torch.Tensor:
    """(T, m): per real token of prompt `sample`, each layer's routed weight at `step`, over generation layers.

    Step 0 is the first denoising step, t = 1 (Fig. 14, row 3). Rows follow the prompt's tokens in order.
    """
    _check(routings)
    routing = routings[step]
    per_token = routed(routing)[sample].mean(-1)  # (L, m)
    return per_token[routing.mask[sample].cpu()]


# (c) ------------------------------------------------------------------------------------------------

def affinity(routings: Sequence[Routing], sample: int | None = None, kind: str = "weights") -> torch.Tensor:
    """(m, n): understanding layer i -> generation layer j, averaged over tokens and steps.

    kind: "weights" (Eq. 3 softmax), "routed" (weights on the top-k set only) or "logits" (raw w_ij).
    """
    if kind not in AFFINITY_KINDS:
        raise ValueError(f"affinity kind {kind!r}; allowed: {AFFINITY_KINDS}")
    pick = {"weights": lambda r: r.weights, "routed": routed, "logits": lambda r: r.logits}[kind]
    return _per_step(routings, lambda r: token_mean(pick(r), r.mask), sample).mean(0)


# (d) ------------------------------------------------------------------------------------------------

def entropy(routing: Routing) -> torch.Tensor:
    """(B, L, n): entropy in nats of the Eq. 3 softmax over the m understanding layers."""
    log_p = torch.log_softmax(routing.logits.double().cpu(), dim=-2)
    return -(log_p.exp() * log_p).sum(-2)


def routing_entropy(routings: Sequence[Routing], sample: int | None = None) -> torch.Tensor:
    """(S,): Eq. 3 entropy per step, mean over generation layers and tokens; log(m) is uniform routing."""
    return _per_step(routings, lambda r: token_mean(entropy(r).mean(-1), r.mask), sample)


def sparsity(routings: Sequence[Routing], sample: int | None = None) -> torch.Tensor:
    """(S,): fraction of the Eq. 3 mass on the top-k set per step, mean over generation layers and tokens.

    1 means the k selected layers hold all the weight; k/m is what uniform routing would give.
    """
    return _per_step(routings, lambda r: token_mean(routed(r).sum(-2).mean(-1), r.mask), sample)


# (e) ------------------------------------------------------------------------------------------------

def selection_frequency(routings: Sequence[Routing], sample: int | None = None) -> torch.Tensor:
    """(m, n): how often understanding layer i is in the top-k set of generation layer j, over tokens and steps.

    Each column sums to k (every decision picks k layers).
    """
    return _per_step(routings, lambda r: token_mean(r.selected, r.mask), sample).mean(0)


def layer_selection_frequency(routings: Sequence[Routing], sample: int | None = None) -> torch.Tensor:
    """(m,): selection frequency of each understanding layer, averaged over generation layers; sums to k."""
    return selection_frequency(routings, sample).mean(-1)


# (f) ------------------------------------------------------------------------------------------------

def difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a - b for two arms' maps of the same shape (e.g. step_contributions, selection_frequency)."""
    if a.shape != b.shape:
        raise ValueError(f"cannot compare maps of shapes {tuple(a.shape)} and {tuple(b.shape)}: the arms must "
                         "share prompts, sampling steps and both towers' depths")
    return a.double() - b.double()


def arm_difference(routings_a: Sequence[Routing], routings_b: Sequence[Routing],
                   sample: int | None = None) -> dict[str, torch.Tensor]:
    """Arm A minus arm B: per-step contributions (S, m) and selection frequencies (m, n)."""
    return {"contribution": difference(step_contributions(routings_a, sample), step_contributions(routings_b, sample)),
            "selection_frequency": difference(selection_frequency(routings_a, sample),
                                              selection_frequency(routings_b, sample))}


# scalars for loggers --------------------------------------------------------------------------------

def summary_scalars(routings: Sequence[Routing], prefix: str = "router") -> dict[str, float]:
    """Entropy and sparsity averaged over steps, and each understanding layer's selection frequency."""
    scalars = {f"{prefix}/entropy": routing_entropy(routings).mean().item(),
               f"{prefix}/sparsity": sparsity(routings).mean().item()}
    for i, freq in enumerate(layer_selection_frequency(routings).tolist()):
        scalars[f"{prefix}/selection_freq/layer_{i}"] = freq
    return scalars
