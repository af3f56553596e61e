"""Shared helpers for the benchmark scripts: the machine header, the chosen precision, and medians of
repeated, warmed-up runs."""
from __future__ import annotations

import os
import statistics
import subprocess
import time
from contextlib import nullcontext

import torch

from mos_lightning.machine import choose_precision, describe_cpu, matmul_peak

os.environ.setdefault("HF_HUB_OFFLINE", "1")
__all__ = ["compute", "header", "interleaved_medians", "matmul_peak", "median_seconds"]


def precision() -> tuple[str, torch.dtype, str]:
    """(trainer precision, compute dtype, why) as `fit` would choose them on this CPU."""
    name, _, why = choose_precision("cpu")
    return name, torch.bfloat16 if name.startswith("bf16") else torch.float32, why


def compute():
    """The autocast a Trainer at the chosen precision runs a step under (none in float32)."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision()[1] == torch.bfloat16 else nullcontext()


def header() -> float:
    """Print what makes figures from different machines comparable; returns the matmul peak (FLOP/s)."""
    name, dtype, why = precision()
    peak = matmul_peak(dtype)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"machine: {describe_cpu()}")
    print(f"precision: {name} ({why})")
    print(f"{str(dtype).removeprefix('torch.')} matmul peak (best of 512, 1024, 2048 square): {peak / 1e9:.1f} GFLOP/s")
    print(f"torch {torch.__version__}, commit {commit or 'unknown'}", flush=True)
    return peak


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
