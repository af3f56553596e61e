"""Samplers as plain functions: Euler ODE from t = 1 (noise) to t = 0 (data), CFG, schedules."""
from __future__ import annotations

from typing import Callable

import torch

from .flow import shift_timesteps

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z_t, t) -> v


def timestep_schedule(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """(steps + 1,) timesteps from 1 to 0, shifted towards noise when shift > 1."""
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)


def classifier_free(conditional: Velocity, unconditional: Velocity, scale: float) -> Velocity:
    """v = v_u + scale (v_c - v_u); scale 1 is the plain conditional velocity."""
    if scale == 1.0:
        return conditional

    def guided(z, t):
        v_u = unconditional(z, t)
        return v_u + scale * (conditional(z, t) - v_u)

    return guided


@torch.no_grad()
def euler(velocity: Velocity, noise: torch.Tensor, steps: int, shift: float = 1.0,
          on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Integrate dz/dt = v from t = 1 to 0; `on_step(i, z)` sees every intermediate state."""
    ts = timestep_schedule(steps, shift, noise.device)
    z = noise
    for i in range(steps):
        t = ts[i].repeat(z.shape[0])  # not a stride-0 view: compiled graphs see the t that validation passes
        z = z + (ts[i + 1] - ts[i]) * velocity(z, t)
        if on_step is not None:
            on_step(i, z)
    return z


@torch.no_grad()
def generate(model, captions: list[str], image_size: tuple[int, int], steps: int = 20, cfg_scale: float = 1.0,
             shift: float = 1.0, seed: int = 0, routings: list | None = None,
             on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Text -> images in [-1, 1] with `model` (a TextToImage); deterministic given `seed`.

    If `routings` is a list, the conditional branch's Routing at every step is appended to it.
    `on_step(i, z)` sees every intermediate latent, as in `euler`.
    """
    device = model.null_context.device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    factor = model.autoencoder.factor
    shape = (len(captions), model.generation.channels, image_size[0] // factor, image_size[1] // factor)
    noise = torch.randn(shape, generator=generator).to(device)
    states = model.states(captions)
    unconditional = torch.ones(len(captions), dtype=torch.bool, device=device)

    def conditional(z, t):
        v, conditioning = model(z, t, states)
        if routings is not None and conditioning.routing is not None:
            routings.append(conditioning.routing)
        return v

    velocity = classifier_free(conditional, lambda z, t: model(z, t, states, unconditional)[0], cfg_scale)
    return model.autoencoder.decode(euler(velocity, noise, steps, shift, on_step))
