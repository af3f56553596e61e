"""Autoencoders: diffusers VAEs (KL and Wan) behind one interface, normalised as their pipelines do, frozen, fp32,
never checkpointed; the generation tower's channels and the bucket multiple follow the autoencoder."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from tiny_vaes import diffusers, tiny_kl, tiny_wan

from mos_lightning.cli import cli_main
from mos_lightning.errors import ConfigError
from mos_lightning.model.autoencoder import DiffusersAutoencoder, PixelSpace
from mos_lightning.model.fusion import MoSFusion
from mos_lightning.model.generation import GenerationTower
from mos_lightning.model.text_to_image import TextToImage

ROOT = Path(__file__).resolve().parents[1]


def test_kl_scalar_normalisation_and_shapes(tmp_path, rng):
    ae = DiffusersAutoencoder(str(tiny_kl(tmp_path / "kl", rng)))
    assert (ae.factor, ae.channels) == (2, 4)
    x = torch.rand(2, 3, 16, 24, generator=rng) * 2 - 1
    z = ae.encode(x)
    raw = ae.vae.encode(x).latent_dist.mean  # the posterior's mean, by hand: (z - shift) * scale
    torch.testing.assert_close(z, (raw - 0.1) * 0.7, rtol=1e-6, atol=1e-6)
    assert z.shape == (2, 4, 8, 12) and z.dtype == torch.float32
    latents = torch.randn(2, 4, 8, 12, generator=rng)
    torch.testing.assert_close(ae.decode(latents), ae.vae.decode(latents / 0.7 + 0.1).sample.clamp(-1, 1))


def test_kl_per_channel_statistics_win_and_overrides(tmp_path, rng):
    mean, std = [0.5, -0.2, 0.1, 0.0], [2.0, 0.5, 1.0, 4.0]
    folder = tiny_kl(tmp_path / "kl", rng, latents_mean=mean, latents_std=std, scaling_factor=1.0)
    ae = DiffusersAutoencoder(str(folder))
    x = torch.rand(1, 3, 8, 8, generator=rng) * 2 - 1
    raw = ae.vae.encode(x).latent_dist.mean
    expect = (raw - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(ae.encode(x), expect, rtol=1e-5, atol=1e-6)
    plain = DiffusersAutoencoder(str(tiny_kl(tmp_path / "plain", rng)), scaling_factor=2.0, shift_factor=-1.0)
    torch.testing.assert_close(plain.encode(x), (plain.vae.encode(x).latent_dist.mean + 1.0) * 2.0)


@pytest.mark.parametrize("wan22", [True, False], ids=["wan2.2", "wan2.1"])
def test_wan_time_axis_and_per_channel_normalisation(tmp_path, rng, wan22):
    folder = tiny_wan(tmp_path / "wan", rng, wan22)
    ae = DiffusersAutoencoder(str(folder))
    config = ae.vae.config
    assert ae.channels == config.z_dim and ae.factor == (8 if wan22 else 2)
    x = torch.rand(2, 3, 16, 24, generator=rng) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (2, config.z_dim, 16 // ae.factor, 24 // ae.factor)  # the factor the encoder really has
    raw = ae.vae.encode(x[:, :, None]).latent_dist.mean[:, :, 0]  # one frame in, one latent frame out
    mean, std = torch.tensor(config.latents_mean)[:, None, None], torch.tensor(config.latents_std)[:, None, None]
    torch.testing.assert_close(z, (raw - mean) / std, rtol=1e-5, atol=1e-6)
    back = ae.decode(z)
    torch.testing.assert_close(back, ae.vae.decode((z * std + mean)[:, :, None]).sample[:, :, 0].clamp(-1, 1),
                               rtol=1e-5, atol=1e-5)
    assert back.shape == x.shape


def test_frozen_float32_under_autocast_and_left_out_of_checkpoints(tmp_path, rng, minilm):
    from mos_lightning.lit import MoSModule

    ae = DiffusersAutoencoder(str(tiny_kl(tmp_path / "kl", rng)))
    ae.train()
    assert not ae.training and not any(p.requires_grad for p in ae.parameters())
    x = torch.rand(2, 3, 8, 8, generator=rng) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = ae.encode(x)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, ae.encode(x))  # the same as outside autocast: it really ran in float32
    module = MoSModule(understanding=minilm, generation=GenerationTower(width=32, depth=1, heads=2, patch_size=2),
                       autoencoder=ae)
    assert module.model.generation.channels == 4  # from the autoencoder
    assert any(k.startswith("autoencoder.vae.") for k in module.model.state_dict())  # there, in the plain model
    saved = module.state_dict()  # what a checkpoint holds
    assert not any(k.startswith(("model.autoencoder.", "model.understanding.")) for k in saved)
    assert any(k.startswith("model.generation.") for k in saved)
    module.load_state_dict(saved, strict=module.strict_loading)  # and it loads back without them
    assert module.model.trainable_parameters() == sum(
        p.numel() for n, p in module.model.named_parameters() if not n.startswith(("autoencoder.", "understanding.")))


def test_channels_follow_the_autoencoder_and_a_forced_mismatch_is_an_error(minilm):
    model = TextToImage(minilm, GenerationTower(width=32, depth=1, heads=2, patch_size=2), MoSFusion, PixelSpace())
    assert model.generation.channels == 3 and model.generation.head.out_features == 2 * 2 * 3
    with pytest.raises(ConfigError, match="channels=4 but the autoencoder's latents have 3"):
        TextToImage(minilm, GenerationTower(width=32, depth=1, heads=2, channels=4), MoSFusion, PixelSpace())


def test_unknown_class_and_missing_folder_are_clear_errors(tmp_path):
    folder = tmp_path / "unet"
    unet = diffusers.UNet2DModel(block_out_channels=(4, 8), norm_num_groups=4, layers_per_block=1,
                                 down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    unet.save_pretrained(folder)
    with pytest.raises(ConfigError, match="is a 'UNet2DModel'; allowed: AutoencoderKL, AutoencoderKLWan"):
        DiffusersAutoencoder(str(folder))
    with pytest.raises(ConfigError, match="no diffusers config"):
        DiffusersAutoencoder(str(tmp_path / "nope"))


def test_pickled_weights_are_refused(tmp_path, rng):
    folder = tmp_path / "kl"
    diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4).save_pretrained(folder,
                                                                                        safe_serialization=False)
    with pytest.raises(ConfigError, match="no safetensors weights.*pickled weights .* are refused"):
        DiffusersAutoencoder(str(folder))  # a .bin is a pickle: loading it could run code


def _fit(tmp_path, autoencoder: dict, *extra) -> list[dict]:
    overlay = tmp_path / "vae.yaml"
    overlay.write_text(yaml.safe_dump({"model": {"autoencoder": autoencoder}}))
    return cli_main(["fit", "--config", str(ROOT / "experiments" / "router_inputs.yaml"), "--config",
                     str(ROOT / "tests" / "tiny.yaml"), "--config", str(overlay), "--arm", "prompt_latent_timestep",
                     f"--trainer.logger.init_args.save_dir={tmp_path}", *extra])


@pytest.mark.slow  # two 2-step fits through the CLI
@pytest.mark.parametrize("kind", ["kl", "wan2.2"])
def test_two_step_fit_through_the_cli(tmp_path, rng, kind):
    folder = tiny_kl(tmp_path / "kl", rng) if kind == "kl" else tiny_wan(tmp_path / "wan", rng)
    patch = 2 if kind == "kl" else 1
    rows = _fit(tmp_path, {"class_path": "mos_lightning.model.autoencoder.DiffusersAutoencoder",
                           "init_args": {"path": str(folder)}}, f"--model.generation.init_args.patch_size={patch}")
    assert rows[0]["steps"] == 2 and rows[0]["val/loss"] > 0
    grid = next((tmp_path / "router_inputs").rglob("events.out.tfevents.*"))
    assert grid.stat().st_size > 0
    ckpt = next((tmp_path / "router_inputs").rglob("*.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert not any(k.startswith("model.autoencoder.") for k in state)


def test_bucket_multiple_follows_patch_and_factor(tmp_path, rng):
    from mos_lightning.cli import MoSCLI

    folder = tiny_kl(tmp_path / "kl", rng)
    overlay = tmp_path / "o.yaml"
    overlay.write_text(yaml.safe_dump({"model": {"autoencoder": {
        "class_path": "mos_lightning.model.autoencoder.DiffusersAutoencoder", "init_args": {"path": str(folder)}}},
        "data": {"class_path": "mos_lightning.data.ImageCaptionDataModule", "init_args": {
            "train": {"class_path": "mos_lightning.data.BucketedShapesDataset", "init_args": {"length": 8}},
            "bucket_base": 32, "bucket_multiple": None}}}))
    cli = MoSCLI(args=["--config", str(ROOT / "tests" / "tiny.yaml"), "--config", str(overlay),
                       "--trainer.logger=false", "--model.generation.init_args.patch_size=4"], run=False)
    assert cli.datamodule.bucket_multiple == 8  # patch 4 x factor 2
    assert all(h % 8 == 0 and w % 8 == 0 for h, w in cli.datamodule.image_sizes)


@pytest.mark.parametrize("overlay, kind", [("vae_flux.yaml", "kl"), ("vae_wan22.yaml", "wan2.2")])
def test_scale_overlays_compose(tmp_path, rng, overlay, kind):
    """The real checkpoints are not here: the overlay is composed with a tiny VAE of the same class in its place."""
    from mos_lightning.cli import MoSCLI

    folder = tiny_kl(tmp_path / "kl", rng) if kind == "kl" else tiny_wan(tmp_path / "wan", rng)
    cli = MoSCLI(args=["--config", str(ROOT / "experiments" / "router_inputs.yaml"), "--config",
                       str(ROOT / "experiments" / "scale" / overlay), f"--model.autoencoder.init_args.path={folder}",
                       "--model.autoencoder.init_args.subfolder=null", "--trainer.logger=false"], run=False)
    model = cli.model.model
    assert type(model.autoencoder.vae).__name__ == ("AutoencoderKL" if kind == "kl" else "AutoencoderKLWan")
    assert model.generation.patch_size == 2 and model.generation.channels == model.autoencoder.channels
    assert cli.datamodule.bucket_multiple == 2 * model.autoencoder.factor
