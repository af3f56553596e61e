"""The shipped shapes autoencoder: loads offline by name through DiffusersAutoencoder, reconstructs fresh renders
of the domain, and its recorded per-channel statistics normalise its latents."""
from __future__ import annotations

import torch

from mos_lightning.data.shapes import ShapesDataset
from mos_lightning.model.autoencoder import SHAPES_AUTOENCODER_PATH, DiffusersAutoencoder


def _renders(seed: int, n: int, size) -> torch.Tensor:
    data = ShapesDataset(n, seed, size)
    return torch.stack([data[i][0] for i in range(n)])


def test_loads_by_name_with_its_statistics():
    ae = DiffusersAutoencoder("shapes-autoencoder")
    assert ae.path == str(SHAPES_AUTOENCODER_PATH) and (ae.factor, ae.channels) == (4, 4)
    config = ae.vae.config
    assert len(config.latents_mean) == len(config.latents_std) == 4 and config.scaling_factor == 1.0
    files = sorted(p.name for p in SHAPES_AUTOENCODER_PATH.iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert sum(p.stat().st_size for p in SHAPES_AUTOENCODER_PATH.iterdir()) <= 10 * 2**20


def test_reconstructs_fresh_renders_at_every_canvas(rng):
    ae = DiffusersAutoencoder("shapes-autoencoder")
    seed = int(torch.randint(10_000_000, 20_000_000, (1,), generator=rng))  # renders no script trained on
    for size in ((32, 32), (24, 40), (40, 24)):
        images = _renders(seed, 24, size)
        back = ae.decode(ae.encode(images))
        mse = ((back - images) / 2).pow(2).mean()  # on [0, 1]
        psnr = 10 * torch.log10(1 / mse)
        assert psnr > 26, f"{size}: PSNR {psnr:.1f} dB"


def test_recorded_statistics_normalise_its_latents(rng):
    ae = DiffusersAutoencoder("shapes-autoencoder")
    seed = int(torch.randint(10_000_000, 20_000_000, (1,), generator=rng))
    z = ae.encode(_renders(seed, 96, (32, 32)))  # (B, 4, 8, 8)
    mean, std = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3))
    assert mean.abs().max() < 0.25 and ((std > 0.75) & (std < 1.3)).all(), (mean, std)
