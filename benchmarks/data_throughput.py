"""Loader throughput against training throughput, and the step with and without the tower cache.

python benchmarks/data_throughput.py

Issue 4's target: the loader sustains >= 2x the samples/s that training consumes, with the
default worker count. The cache comparison runs the frozen tower on every step (no memo) versus
reading the same captions' states from a filled disk cache. The decoding section times real JPEG
corpora (a folder and a WebDataset shard, 256-640 px at aspect ratios 1:2..2:1) through the bucketed
ImageCaptionDataModule, at the embedded bucket base (32) and at 256.
"""
from __future__ import annotations

import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import compute, header, median_seconds
from PIL import Image

from mos_lightning.cli import MoSCLI
from mos_lightning.data import FolderDataset, ImageCaptionDataModule, ShardDataset
from mos_lightning.model.understanding import UnderstandingTower
from mos_lightning.state_cache import StateCache, dataset_captions, fill, tower_identity


def loader_rate(loader, batches: int = 60) -> float:
    it = iter(loader)
    next(it)  # workers warm up
    start, n = time.perf_counter(), 0
    for _, batch in zip(range(batches), it):
        n += len(batch)
    return n / (time.perf_counter() - start)


def step_time(module, batch) -> float:
    t = torch.rand(len(batch))

    def step():
        with compute():
            loss = module.loss(batch, t).mean()
        loss.backward()

    return median_seconds(step, 10)


def write_corpus(root: Path, n: int = 384) -> tuple[Path, Path]:
    """n photo-like JPEGs (smooth colour fields plus grain) with captions, as a folder and as one shard."""
    rng, folder = np.random.default_rng(0), root / "folder"
    folder.mkdir()
    with tarfile.open(root / "shard-000000.tar", "w") as tar:
        for i in range(n):
            short, ratio = int(rng.integers(256, 513)), float(np.exp(rng.uniform(-np.log(2), np.log(2))))
            h, w = (short, int(short * ratio)) if ratio >= 1 else (int(short / ratio), short)
            field = np.linspace(rng.uniform(0, 255, 3), rng.uniform(0, 255, 3), w)[None] + rng.normal(0, 12, (h, w, 3))
            Image.fromarray(field.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
            (folder / f"{i:05d}.txt").write_text(f"a photo number {i}")
            for suffix in (".jpg", ".txt"):
                tar.add(folder / f"{i:05d}{suffix}", arcname=f"{i:05d}{suffix}")
    return folder, root / "shard-000000.tar"


def decode_rates(root: Path) -> None:
    folder, shard = write_corpus(root)
    for base in (32, 256):
        for workers in (0, 2):
            for name, source in (("folder", FolderDataset(folder, base)), ("shard", ShardDataset(str(shard), base))):
                data = ImageCaptionDataModule(source, batch_size=32, num_workers=workers, bucket_base=base,
                                              bucket_multiple=8 if base == 32 else 16)
                rate = loader_rate(data.train_dataloader(), batches=6)
                print(f"{name:>6} JPEG decode + bucket crop to base {base:3d}, num_workers={workers}: "
                      f"{rate:6.0f} samples/s")


def main() -> None:
    header()
    cli = MoSCLI(args=["--trainer.logger=false"], run=False)
    module, data = cli.model, cli.datamodule
    data.setup("fit")
    loader = data.train_dataloader()
    batch = next(iter(loader))
    print(f"shapes loader, num_workers={loader.num_workers}: {loader_rate(loader):.0f} samples/s")
    with tempfile.TemporaryDirectory() as root:
        plain = UnderstandingTower(memo_size=0)
        cache = StateCache(root, tower_identity(plain))
        fill(plain, dataset_captions(loader.dataset)[:2048] + batch.captions, cache)
        cached = UnderstandingTower(memo_size=0, cache_dir=root)
        for label, tower in (("tower every step", plain), ("disk cache", cached)):
            module.model.understanding = tower
            step = step_time(module, batch)
            states = median_seconds(lambda: tower(batch.captions), 10)
            print(f"{label:>17}: training step {step * 1e3:6.1f} ms ({len(batch) / step:5.1f} samples/s), "
                  f"tower states {states * 1e3:5.1f} ms")
    with tempfile.TemporaryDirectory() as root:
        decode_rates(Path(root))


if __name__ == "__main__":
    main()
