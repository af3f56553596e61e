"""Tiny random diffusers autoencoders, saved with save_pretrained inside a test (nothing downloaded)."""
from __future__ import annotations

from pathlib import Path

import diffusers
import torch


def _perturb(vae, rng):
    with torch.no_grad():  # random init leaves some layers at zero: make every weight matter
        for p in vae.parameters():
            p.add_(torch.randn(p.shape, generator=rng) * 0.02)
    return vae


def tiny_kl(folder: Path, rng, **config) -> Path:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    config = {"block_out_channels": (8, 16), "down_block_types": ("DownEncoderBlock2D",) * 2,
              "up_block_types": ("UpDecoderBlock2D",) * 2, "norm_num_groups": 4, "latent_channels": 4,
              "scaling_factor": 0.7, "shift_factor": 0.1, **config}
    _perturb(diffusers.AutoencoderKL(**config), rng).save_pretrained(folder)
    return folder


def tiny_wan(folder: Path, rng, wan22: bool = True) -> Path:
    """Wan 2.2's layout (residual blocks, 2x2 patches folded into 12 input channels) or Wan 2.1's, tiny."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    z = 8 if wan22 else 4
    mean = (torch.randn(z, generator=rng) * 0.3).tolist()
    std = (torch.rand(z, generator=rng) + 0.5).tolist()
    layout = dict(dim_mult=[1, 2, 2], temperal_downsample=[False, True], is_residual=True, patch_size=2,
                  in_channels=12, out_channels=12) if wan22 else dict(dim_mult=[1, 2], temperal_downsample=[False])
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=z, num_res_blocks=1, latents_mean=mean, latents_std=std,
                                     **layout)
    _perturb(vae, rng).save_pretrained(folder)
    return folder
