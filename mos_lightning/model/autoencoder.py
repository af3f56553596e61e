"""The autoencoder is injectable; the embedded default works in pixel space."""
from __future__ import annotations

import torch
from torch import nn


class PixelSpace(nn.Module):
    """Identity autoencoder: the latent is the image in [-1, 1]."""

    factor = 1  # spatial compression

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)

    def channels(self, image_channels: int) -> int:
        return image_channels
