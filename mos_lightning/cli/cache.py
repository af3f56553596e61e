"""`python -m mos_lightning cache --config ... --cache_dir DIR`: fill the understanding-tower cache.

Takes the same --config files and overrides as `fit`; encodes every caption of the configured
DataModule's train and val sets with the configured tower, and writes them under DIR. Train with
`--model.understanding.init_args.cache_dir DIR` to read them instead of running the tower.
"""
from __future__ import annotations

import time

from ..state_cache import StateCache, dataset_captions, fill, tower_identity


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
    return report
