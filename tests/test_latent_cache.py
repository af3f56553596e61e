"""The latent cache: the tower cache's machinery holding an autoencoder's posteriors, keyed by the exact pixels
encoded; hits are bit for bit what the fill wrote and skip the encoder; misses run it; half-written or damaged
shards are never read; `cache` fills it through the CLI for every image training will crop."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from tiny_vaes import tiny_kl

from mos_lightning.model.autoencoder import DiffusersAutoencoder
from mos_lightning.state_cache import LATENTS, MEMOS, StateCache, fill_latents, image_key

ROOT = Path(__file__).resolve().parents[1]


def _images(rng, n=5, size=(8, 16)):
    return torch.rand(n, 3, *size, generator=rng) * 2 - 1


def _filled(tmp_path, rng, images):
    folder = tiny_kl(tmp_path / "kl", rng)
    writer = DiffusersAutoencoder(str(folder))
    cache = StateCache(tmp_path / "cache", writer.identity(), LATENTS.dtype)
    seen, written = fill_latents(writer.posterior, [images[:3], images[3:]], cache, shard_size=2)
    assert (seen, written) == (len(images), len(images))
    assert fill_latents(writer.posterior, [images], cache) == (len(images), 0)  # all there already
    return folder, writer, cache


def test_hits_are_bit_for_bit_and_skip_the_encoder(tmp_path, rng, monkeypatch):
    images = _images(rng)
    folder, writer, cache = _filled(tmp_path, rng, images)
    stored = torch.cat([writer.posterior(images[:3]), writer.posterior(images[3:])])  # as the fill batched them
    reader = DiffusersAutoencoder(str(folder), cache_dir=str(tmp_path / "cache"))
    monkeypatch.setattr(reader, "posterior", lambda x: pytest.fail("the encoder ran on a cache hit"))
    order = [4, 0, 2, 1, 3]  # one batch, unlike any the fill encoded
    got = reader.encode(images[order])
    mean = stored[order, :4]
    assert torch.equal(got, (mean - reader.shift) * reader.scale)
    assert (reader.store.cache_hits, reader.store.cache_misses) == (5, 0)


def test_a_changed_image_or_crop_misses_and_runs_the_encoder(tmp_path, rng):
    images = _images(rng)
    folder, writer, _ = _filled(tmp_path, rng, images)
    reader = DiffusersAutoencoder(str(folder), cache_dir=str(tmp_path / "cache"))
    changed = images[:2].clone()
    changed[0, 0, 0, 0] += 1e-3  # one pixel
    cropped = images[2:3, :, :, :8]  # the same image, another crop
    for batch in (changed, cropped):
        torch.testing.assert_close(reader.encode(batch), writer.encode(batch))
    assert (reader.store.cache_hits, reader.store.cache_misses) == (1, 2)  # images[1] was unchanged


def test_sampling_draws_fresh_noise_on_a_hit(tmp_path, rng):
    images = _images(rng, n=2)
    folder, writer, _ = _filled(tmp_path, rng, images)
    reader = DiffusersAutoencoder(str(folder), cache_dir=str(tmp_path / "cache"), sample=True)
    torch.manual_seed(1)
    first = reader.encode(images)
    torch.manual_seed(2)
    second = reader.encode(images)
    assert not torch.equal(first, second) and reader.store.cache_misses == 0
    parameters = writer.posterior(images)
    torch.manual_seed(1)  # the same draw by hand: mean + std * noise, normalised
    mean, logvar = parameters.chunk(2, dim=1)
    by_hand = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn(mean.shape)
    torch.testing.assert_close(first, (by_hand - reader.shift) * reader.scale)


def test_half_written_and_damaged_shards_are_never_read(tmp_path, rng, caplog):
    images = _images(rng, n=2)
    folder, writer, cache = _filled(tmp_path, rng, images)
    (cache.dir / ".tmp-shard-killed.safetensors").write_bytes(b"half")  # a fill killed mid-write
    (cache.dir / "shard-damaged.safetensors").write_bytes(b"\x00garbage")
    reader = DiffusersAutoencoder(str(folder), cache_dir=str(tmp_path / "cache"))
    assert "skipping unreadable shard shard-damaged" in caplog.text
    reader.encode(images)
    assert reader.store.cache_hits == 2


def test_the_memo_is_shared_by_autoencoders_of_one_identity(tmp_path, rng, monkeypatch):
    MEMOS.clear()
    folder = tiny_kl(tmp_path / "kl", rng)
    images = _images(rng, n=3)
    first = DiffusersAutoencoder(str(folder), memo_size=8)
    want = first.encode(images)
    second = DiffusersAutoencoder(str(folder), memo_size=8)  # a later arm builds its own
    monkeypatch.setattr(second, "posterior", lambda x: pytest.fail("the encoder ran on a memo hit"))
    assert torch.equal(second.encode(images), want)
    assert image_key(images[0]) in second.store.memo
    MEMOS.clear()


@pytest.mark.slow  # the cache command through the CLI, then a training build that reads it
def test_cache_command_writes_every_image_training_reads(tmp_path, rng, monkeypatch):
    from mos_lightning.cli import MoSCLI, cli_main

    folder = tiny_kl(tmp_path / "kl", rng)
    overlay = tmp_path / "vae.yaml"
    overlay.write_text(yaml.safe_dump({"model": {"autoencoder": {
        "class_path": "mos_lightning.model.autoencoder.DiffusersAutoencoder", "init_args": {"path": str(folder)}}}}))
    configs = ["--config", str(ROOT / "experiments" / "router_inputs.yaml"), "--config",
               str(ROOT / "tests" / "tiny.yaml"), "--config", str(overlay), "--model.generation.init_args.patch_size=2"]
    report = cli_main(["cache", *configs, "--cache_dir", str(tmp_path / "cache")])
    assert report["latents"]["images"] == 64 + 8 and report["latents"]["written"] == report["latents"]["cached"]
    cli = MoSCLI(args=[*configs, "--trainer.logger=false",
                       f"--model.autoencoder.init_args.cache_dir={tmp_path / 'cache'}"], run=False)
    autoencoder = cli.model.model.autoencoder
    monkeypatch.setattr(autoencoder, "posterior", lambda x: pytest.fail("the encoder ran on a cache hit"))
    batch = next(iter(cli.datamodule.train_dataloader()))
    autoencoder.encode(batch.images)
    assert autoencoder.store.cache_hits == len(batch.images) and autoencoder.store.cache_misses == 0
