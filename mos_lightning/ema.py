"""An exponential moving average of trainable parameters, for validation, sampling and evaluation.

The average is one buffer per parameter, a clone of it, so it sits in the module's state dict (a checkpoint
carries it, and `fit --ckpt_path` restores it, with no special case) and, once the model is sharded, each
buffer is a DTensor sharded like its parameter: updates and swaps are elementwise on the local shard, with no
communication and no deep copy of the module (which FSDP2 refuses). A distributed checkpoint saves and loads
the buffers shard by shard, as it does the parameters.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .errors import ConfigError


def buffer_name(parameter: str) -> str:
    """A parameter's name as the EMA's buffer name ("." is not allowed in one); activation checkpointing's
    wrapper is left out, so the name is the same with or without it."""
    return parameter.replace("._checkpoint_wrapped_module", "").replace(".", "__")


class Ema(nn.Module):
    """shadow <- decay**every * shadow + (1 - decay**every) * param, after optimizer steps start, start + every, ...

    Args:
        decay: per-step decay in (0, 1); the average spans about 1 / (1 - decay) steps.
        every: update every this many optimizer steps (the decay is compounded, so the horizon stays the same).
        start: the optimizer step at which the shadow is set to the parameters; before it, the raw
            parameters are used everywhere.
    """

    def __init__(self, decay: float = 0.999, every: int = 1, start: int = 0):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"model.ema.decay={decay} out of range: allowed (0, 1)")
        if not isinstance(every, int) or every < 1:
            raise ConfigError(f"model.ema.every={every!r}: must be an int >= 1")
        if not isinstance(start, int) or start < 0:
            raise ConfigError(f"model.ema.start={start!r}: must be an int >= 0")
        self.decay, self.every, self.start = decay, every, start
        self.register_buffer("started", torch.tensor(False))
        self.names: list[str] = []
        self.params: list[torch.Tensor] = []

    @torch.no_grad()
    def bind(self, named_parameters: Iterable[tuple[str, nn.Parameter]]) -> None:
        """The parameters to average: the trainable ones. Call again once sharding has replaced them: the
        buffers are made anew, like their parameters (DTensors after fully_shard)."""
        named = [(n, p) for n, p in named_parameters if p.requires_grad]
        self.names, self.params = [buffer_name(n) for n, _ in named], [p for _, p in named]
        for name, p in zip(self.names, self.params):
            self.register_buffer(name, p.detach().clone())

    @property
    def shadow(self) -> list[torch.Tensor]:
        return [self._buffers[name] for name in self.names]

    def due(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.every == 0

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after optimizer step number `step` (1-based: the trainer's global_step once it has stepped)."""
        if not self.due(step):
            return
        params = [p.detach() for p in self.params]
        if not self.started:
            for s, p in zip(self.shadow, params):  # once; DTensor has no sharding rule for _foreach_copy_
                s.copy_(p)
            self.started.fill_(True)
            return
        torch._foreach_lerp_(self.shadow, params, 1.0 - self.decay ** self.every)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange parameters and shadow in place (the same tensors, so compiled graphs stay valid); nothing
        before the average has started."""
        if not self.started:
            return
        for p, s in zip(self.params, self.shadow):
            held = p.detach().clone()
            p.copy_(s)
            s.copy_(held)
