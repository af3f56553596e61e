"""Loader throughput against training throughput, and the step with and without the tower cache.

python benchmarks/data_throughput.py

Issue 4's target: the loader sustains >= 2x the samples/s that training consumes, with the
default worker count. The cache comparison runs the frozen tower on every step (no memo) versus
reading the same captions' states from a filled disk cache.
"""
from __future__ import annotations

import tempfile
import time

import torch
from common import median_seconds

from mos_lightning.cli import MoSCLI
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
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module.loss(batch, t).mean()
        loss.backward()

    return median_seconds(step, 10)


def main() -> None:
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


if __name__ == "__main__":
    main()
