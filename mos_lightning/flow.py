"""Rectified flow (Eq. 1): z_t = (1 - t) z0 + t z1, target v = z1 - z0, MSE; t sampling (App. A).

t = 0 is data and t = 1 is noise, as in the paper.
"""
from __future__ import annotations

import math

import torch

from .errors import ConfigError


def interpolate(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, *([1] * (z0.dim() - 1))).to(z0.dtype)
    return (1 - t) * z0 + t * z1


def velocity_target(z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    return z1 - z0


def velocity_from_data(z_t: torch.Tensor, z0: torch.Tensor, t: torch.Tensor, t_min: float = 0.05) -> torch.Tensor:
    """The velocity implied by a data prediction z0 at z_t: v = (z_t - z0) / t, with t >= t_min.

    For a network that predicts z0 (x-prediction, Li & He 2025, "Back to Basics: Let Denoising
    Generative Models Denoise") while the loss stays Eq. 1's velocity MSE; t_min bounds the
    division near t = 0 (their 0.05).
    """
    t = t.view(-1, *([1] * (z_t.dim() - 1))).clamp_min(t_min).to(z0.dtype)
    return (z_t.to(z0.dtype) - z0) / t


def flow_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE (B,), so callbacks can look at losses by timestep or category."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution shift (SD3): pushes t towards noise for shift > 1; identity at shift = 1."""
    return shift * t / (1 + (shift - 1) * t)


class TimestepSampler:
    """Draws training timesteps in (0, 1); subclasses are chosen by `class_path`."""

    def __init__(self, shift: float = 1.0):
        if shift <= 0:
            raise ConfigError(f"timesteps.shift={shift} must be > 0")
        self.shift = shift

    def draw(self, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return shift_timesteps(self.draw(n, generator, device), self.shift)


class LogitNormal(TimestepSampler):
    """t = sigmoid(N(mean, std^2)): the low-resolution pre-training default (App. A)."""

    def __init__(self, mean: float = 0.0, std: float = 1.0, shift: float = 1.0):
        super().__init__(shift)
        if std <= 0:
            raise ConfigError(f"timesteps.std={std} must be > 0")
        self.mean, self.std = mean, std

    def draw(self, n, generator, device):
        return torch.sigmoid(self.mean + self.std * torch.randn(n, generator=generator, device=device))


class ModeSampling(TimestepSampler):
    """SD3's mode sampling with heavy tails, f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u).

    App. A switches to it (scale 0.8, shift 3.0) for high-resolution stages.
    """

    def __init__(self, scale: float = 0.8, shift: float = 3.0):
        super().__init__(shift)
        if not -1.0 <= scale <= 2.0 / (math.pi - 2.0):
            raise ConfigError(f"timesteps.scale={scale} out of range: allowed [-1, {2 / (math.pi - 2):.3f}] "
                              "(keeps f monotone)")
        self.scale = scale

    def draw(self, n, generator, device):
        u = torch.rand(n, generator=generator, device=device)
        return 1 - u - self.scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
