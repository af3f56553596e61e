"""`python -m mos_lightning cache --config ... --cache_dir DIR`: fill the understanding-tower cache, and the
latent cache when the model has a VAE.

Takes the same --config files and overrides as `fit`; encodes every caption of the configured DataModule's
train and val sets with the configured tower, and, with a `DiffusersAutoencoder`, every image (cropped to its
bucket, as training crops it) with the autoencoder, and writes them under DIR (a folder per tower or
autoencoder identity). Train with `--model.understanding.init_args.cache_dir DIR` and
`--model.autoencoder.init_args.cache_dir DIR` to read them instead of running the tower and the encoder.
"""
from __future__ import annotations

import time

from ..state_cache import LATENTS, StateCache, dataset_captions, fill, fill_latents, tower_identity


def cache_main(args: list[str]) -> dict:
    from ..errors import ConfigError
    from .base import MoSCLI, pop_option

    cache_dir, args = pop_option(args, "--cache_dir")
    batch_size, args = pop_option(args, "--batch_size", default="256")
    if cache_dir is None:
        raise ConfigError("cache: --cache_dir is required (where the shards go)")
    cli = MoSCLI(args=[*args, "--trainer.logger=false", "--model.understanding.init_args.cache_dir=null"], run=False)
    tower, data = cli.model.model.understanding, cli.datamodule
    data.setup("fit")
    loaders = (data.train_dataloader(), data.val_dataloader())
    captions = [c for loader in loaders for c in dataset_captions(loader.dataset)]
    cache = StateCache(cache_dir, tower_identity(tower))
    start = time.perf_counter()
    written = fill(tower, captions, cache, int(batch_size))
    report = {"identity": cache.dir.name, "captions": len(set(captions)), "written": written,
              "cached": len(cache), "seconds": round(time.perf_counter() - start, 1)}
    print(f"cache {cache.dir}: {report}")
    autoencoder = cli.model.model.autoencoder
    if hasattr(autoencoder, "posterior"):
        report["latents"] = cache_latents(autoencoder, data, cache_dir)
    return report


def cache_latents(autoencoder, data, cache_dir: str) -> dict:
    """Every train and val image's posterior, in the autoencoder's identity folder."""
    import torch

    cache = StateCache(cache_dir, autoencoder.identity(), LATENTS.dtype)
    start = time.perf_counter()
    every = getattr(data, "every_image", None)  # else an epoch of each loader (drop_last may leave a few out)
    loaders = [every(split) for split in ("train", "val")] if every else [data.train_dataloader(),
                                                                          data.val_dataloader()]
    batches = (batch.images for loader in loaders for batch in loader)
    with torch.no_grad():
        seen, written = fill_latents(lambda images: autoencoder.posterior(images.float()), batches, cache)
    report = {"identity": cache.dir.name, "images": seen, "written": written, "cached": len(cache),
              "seconds": round(time.perf_counter() - start, 1)}
    print(f"latent cache {cache.dir}: {report}")
    return report
