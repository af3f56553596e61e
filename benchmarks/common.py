"""Shared timing helpers for the benchmark scripts: medians of repeated, warmed-up runs."""
from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def median_seconds(fn, repeats: int = 10, warmup: int = 2) -> float:
    return interleaved_medians({"fn": fn}, repeats, warmup)["fn"]


def interleaved_medians(fns: dict, repeats: int = 10, warmup: int = 2) -> dict:
    """Median seconds of each function, timed in turn round after round, so the machine's drift (it is
    shared and noisy) hits every contender alike and their ratio means something."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def matmul_peak(sizes=(512, 1024, 2048)) -> float:
    """The best bf16 matmul rate over a few square sizes: this CPU's practical peak, so that figures
    taken on different machines can be compared."""
    import torch

    rates = []
    for n in sizes:
        a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
        rates.append(2 * n**3 / median_seconds(lambda: a @ b, 10))
    return max(rates)
