"""Position and timestep encodings shared by the generation tower and the router."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError


def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps in [0, 1] -> (B, dim) sinusoidal features (Ho et al., 2020)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]  # scale so t in [0,1] spans the periods
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """Sinusoidal features, then an MLP to the model width."""

    def __init__(self, width: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal(t, self.frequency_dim).to(self.mlp[0].weight.dtype))  # (B, width)


def sincos_2d(height: int, width: int, dim: int, device=None) -> torch.Tensor:
    """(height*width, dim) fixed 2-D sin-cos positions: defined for any grid, so any bucket shape works."""
    if dim % 4:
        raise ConfigError(f"generation.width ({dim}) must be divisible by 4 for 2-D positions")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    parts = [f(c.reshape(-1, 1).float() * omega) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1)


def rope_2d(height: int, width: int, head_dim: int, leading: int = 0, theta: float = 100.0,
            device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D rotary positions for a height x width token grid: (cos, sin), each (leading + height*width, head_dim).

    Half the rotated pairs turn with the row, half with the column (axial RoPE, as in Lumina and
    FLUX), so attention between image tokens depends on their offset. `leading` tokens before the
    grid (registers, a self-attention text stream) get angle 0: they are not rotated.
    """
    quarter = head_dim // 4  # GenerationTower checks head_dim % 4 == 0
    freqs = theta ** -(torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    angles = torch.cat([ys.reshape(-1, 1) * freqs, xs.reshape(-1, 1) * freqs], dim=1)  # (N, head_dim / 2)
    angles = torch.cat([angles.new_zeros(leading, head_dim // 2), angles]).repeat(1, 2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate (..., L, head_dim) by the angles of `rope`: pair i is (x_i, x_{i + head_dim/2})."""
    cos, sin = (r.to(x.dtype) for r in rope)
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin
