"""The autoencoder the generation tower works in: pixels, or a frozen VAE's normalised latent space.

Every autoencoder has a spatial `factor` and latent `channels`; `encode` maps images in [-1, 1] to normalised
latents and `decode` maps back. It is frozen, stays in eval mode and computes in float32 even under bf16
autocast (App. A: "the VAE compressor is maintained in float32"), and checkpoints leave it out (it reloads from
its path, like the frozen understanding tower).
"""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..state_cache import LATENTS, StateStore, image_key

# diffusers classes this loader knows the latent conventions of; any other `_class_name` is refused
DIFFUSERS_CLASSES = ("AutoencoderKL", "AutoencoderKLWan")
# the shipped AutoencoderKL of the embedded shapes domain (tools/train_shapes_autoencoder.py), by name
SHAPES_AUTOENCODER = "shapes-autoencoder"
SHAPES_AUTOENCODER_PATH = Path(__file__).resolve().parent / "assets" / "shapes_autoencoder"


class Autoencoder(nn.Module):
    """Base: frozen, eval mode, float32. Subclasses set `factor` and `channels` and implement _encode/_decode."""

    factor: int = 1
    channels: int = 3

    def train(self, mode: bool = True) -> "Autoencoder":
        return super().train(False)  # frozen: never dropout/noise, whatever the trainer asks

    @contextmanager
    def _float32(self, x: torch.Tensor):
        with torch.autocast(x.device.type, enabled=False):
            yield x.float()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> normalised latents (B, channels, H / factor, W / factor), float32."""
        with self._float32(images) as x:
            return self._encode(x)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images (B, 3, H, W) clamped to [-1, 1], float32."""
        with self._float32(latents) as z:
            return self._decode(z).clamp(-1, 1)

    def identity(self) -> str:
        """A short hash of what changes a latent (the latent cache's folder name)."""
        return "pixels"

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PixelSpace(Autoencoder):
    """Identity autoencoder: the latent is the image in [-1, 1] (the embedded default)."""

    factor, channels = 1, 3

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


class DiffusersAutoencoder(Autoencoder):
    """Any diffusers autoencoder of DIFFUSERS_CLASSES, from a local folder or a hub id; the class comes from the
    config's `_class_name`. Weights load from safetensors only (a pickle could run code).

    Normalisation, read from the config unless given here (../shared/DESIGN.md §5, diffusers' pipelines):
    - per-channel `latents_mean` / `latents_std` when the config has them (Wan 2.1/2.2, and KL models that
      record them, like the shipped shapes autoencoder): z_norm = (z - mean) / std * scaling_factor, with
      scaling_factor 1 for Wan (its pipelines use none);
    - else SD/SD3/Flux scalars: z_norm = (z - shift_factor) * scaling_factor.
    Wan encodes video: images get a time axis of 1, which its causal encoder maps to one latent frame.

    Args:
        path: folder (or hub id) holding config.json and diffusion_pytorch_model.safetensors;
            "shapes-autoencoder" is the one shipped for the embedded shapes domain.
        subfolder: e.g. "vae" inside a pipeline folder.
        scaling_factor, shift_factor, latents_mean, latents_std: override the config's normalisation.
        sample: draw from the posterior when encoding (as SD trains); False takes its mean.
        cache_dir: a latent cache written by `python -m mos_lightning cache` to read from (never written here).
        memo_size: latents kept in memory (LRU), shared by every autoencoder of this identity in the process, so
            the later arms of an ablation skip the encoder; 0 keeps none.
    Both stores hold the posterior (mean and log-variance) of the exact pixels encoded, so `sample` still draws
    fresh noise on a hit.
    """

    def __init__(self, path: str, subfolder: str | None = None, scaling_factor: float | None = None,
                 shift_factor: float | None = None, latents_mean: list[float] | None = None,
                 latents_std: list[float] | None = None, sample: bool = False, cache_dir: str | None = None,
                 memo_size: int = 0):
        super().__init__()
        path = str(SHAPES_AUTOENCODER_PATH) if path == SHAPES_AUTOENCODER else path
        self.path, self.subfolder, self.sample = path, subfolder, sample
        self.vae = load_diffusers(path, subfolder)
        config = self.vae.config
        self.video = type(self.vae).__name__ == "AutoencoderKLWan"
        self.channels = config.z_dim if self.video else config.latent_channels
        self.factor = spatial_factor(self.vae)
        mean = latents_mean if latents_mean is not None else config.get("latents_mean")
        std = latents_std if latents_std is not None else config.get("latents_std")
        if (mean is None) != (std is None):
            raise ConfigError(f"autoencoder {path}: latents_mean and latents_std come together (got one)")
        if mean is not None:
            scale = scaling_factor if scaling_factor is not None else (1.0 if self.video else config.scaling_factor)
            self._check_channels(path, mean, std)
            shift, scale = torch.tensor(mean), scale / torch.tensor(std, dtype=torch.float64)
        else:
            shift = torch.tensor(float(shift_factor if shift_factor is not None else config.get("shift_factor") or 0))
            scale = torch.tensor(float(scaling_factor if scaling_factor is not None else config.scaling_factor))
        # buffers, so they follow .to(device); not persistent: nothing of the autoencoder goes in a checkpoint
        self.register_buffer("shift", shift.float().reshape(-1, 1, 1), persistent=False)
        self.register_buffer("scale", scale.float().reshape(-1, 1, 1), persistent=False)
        self.vae.requires_grad_(False)
        self.train(False)
        self.store = StateStore(self.identity(), memo_size, cache_dir, layout=LATENTS)

    def _check_channels(self, path: str, mean, std) -> None:
        if len(mean) != self.channels or len(std) != self.channels:
            raise ConfigError(f"autoencoder {path}: latents_mean/latents_std have {len(mean)}/{len(std)} entries "
                              f"for {self.channels} latent channels")

    def posterior(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float32 in [-1, 1] -> the encoder's posterior parameters (B, 2 x channels, h, w)."""
        parameters = self.vae.encode(x[:, :, None] if self.video else x).latent_dist.parameters
        return parameters[:, :, 0] if self.video else parameters

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if self.store.active:
            keys = [image_key(image) for image in x]
            rows = {k: i for i, k in enumerate(keys)}
            parameters = self.store.lookup(keys, lambda missing: self.posterior(x[[rows[k] for k in missing]]),
                                           x.device, torch.float32)
        else:
            parameters = self.posterior(x)
        posterior = DiagonalGaussianDistribution(parameters)
        z = posterior.sample() if self.sample else posterior.mode()
        return (z - self.shift) * self.scale

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        z = z / self.scale + self.shift
        images = self.vae.decode(z[:, :, None] if self.video else z).sample
        return images[:, :, 0] if self.video else images

    def identity(self) -> str:
        """The stores hold posteriors, which only the VAE's class, config and weights change (not the
        normalisation or `sample`)."""
        facts = {"class": type(self.vae).__name__, "config": dict(self.vae.config), "weights": weight_files(self)}
        return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_diffusers(path: str, subfolder: str | None = None) -> nn.Module:
    """The autoencoder named by the config's `_class_name`, in float32, from safetensors only."""
    import diffusers

    try:
        config = diffusers.AutoencoderKL.load_config(path, subfolder=subfolder)  # reads config.json only
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.autoencoder: no diffusers config at {path!r}"
                          f"{f' (subfolder {subfolder!r})' if subfolder else ''}: {err}") from None
    name = config.get("_class_name")
    if name not in DIFFUSERS_CLASSES:
        raise ConfigError(f"model.autoencoder: {path!r} is a {name!r}; allowed: {', '.join(DIFFUSERS_CLASSES)}")
    try:
        return getattr(diffusers, name).from_pretrained(path, subfolder=subfolder, torch_dtype=torch.float32,
                                                        use_safetensors=True)
    except OSError as err:
        raise ConfigError(f"model.autoencoder: {path!r} has no safetensors weights ({err}); pickled weights (.bin) "
                          f"are refused because loading a pickle can run code: convert them to safetensors") from None


def spatial_factor(vae: nn.Module) -> int:
    """Pixels per latent cell along each side, from the architecture: each block after the first halves the
    sides, and Wan 2.2 folds patch_size x patch_size pixels into channels first (its 16x = 2 x 2^3)."""
    config = vae.config
    if type(vae).__name__ == "AutoencoderKLWan":
        return (config.get("patch_size") or 1) * 2 ** (len(config.dim_mult) - 1)
    return 2 ** (len(config.block_out_channels) - 1)


def weight_files(autoencoder: DiffusersAutoencoder) -> list:
    folder = Path(autoencoder.path) / (autoencoder.subfolder or "")
    if not folder.is_dir():
        return [autoencoder.path, autoencoder.subfolder]  # a hub id: its name stands for its revision
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.glob("*.safetensors"))
