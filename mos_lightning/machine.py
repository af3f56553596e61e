"""What this machine is: CPU model and flags, native bf16, the precision that fits, the matmul rate.

Figures from different machines only compare with these beside them, and bf16 is fast only where the
hardware has it: emulated on a CPU without it, a bf16 training step is an order of magnitude slower than float32
(benchmarks/precision.py).
"""
from __future__ import annotations

import functools
import platform
import time

import torch

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what decides CPU matmul speed


@functools.lru_cache(maxsize=1)
def cpu_info() -> tuple[str, tuple[str, ...]]:
    """(model name, the FLAGS this CPU has), from /proc/cpuinfo where there is one."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return model, tuple(flag for flag in FLAGS if flag in flags)


def native_bf16(device_type: str) -> bool:
    """bf16 arithmetic in hardware, as torch checks it: oneDNN's test on CPU, the device's on CUDA."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def device_type(accelerator: str | None) -> str:
    """The device Lightning's `accelerator` setting lands on (its "auto" prefers CUDA)."""
    accelerator = str(accelerator or "auto")
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "cuda"
    return "cpu" if accelerator in ("auto", "cpu", "gpu", "cuda") else accelerator


def choose_precision(device: str) -> tuple[str, str, str]:
    """(trainer precision, tower dtype, why) for `device`: bf16 where it is native, float32 elsewhere."""
    if native_bf16(device):
        where = torch.cuda.get_device_name() if device == "cuda" else f"this CPU ({cpu_info()[0]})"
        return "bf16-mixed", "bfloat16", f"native bf16 on {where}"
    if device == "cpu":
        return "32-true", "float32", (f"no native bf16 on this CPU ({cpu_info()[0]}, "
                                      f"{torch.backends.cpu.get_cpu_capability()}): bf16 would be emulated, "
                                      "an order of magnitude slower than float32")
    return "32-true", "float32", f"no native bf16 on {device}"


def auto_dtype() -> str:
    """The frozen tower's dtype when its config says "auto": the same rule as the trainer's precision."""
    return choose_precision(device_type("auto"))[1]


def describe_cpu() -> str:
    model, flags = cpu_info()
    capability = torch.backends.cpu.get_cpu_capability()
    bf16 = "native bf16" if native_bf16("cpu") else "no native bf16"
    return f"{model} ({torch.get_num_threads()} threads, {capability}, flags: {' '.join(flags) or 'none'}, {bf16})"


def matmul_peak(dtype: torch.dtype = torch.bfloat16, sizes=(512, 1024, 2048), repeats: int = 10,
                budget_s: float | None = None, device: str = "cpu") -> float:
    """The best matmul rate (FLOP/s, fastest of `repeats`) over square `sizes` in `dtype`: this machine's
    practical peak.

    With `budget_s`, sizes are tried smallest first and the search stops once the budget is spent, so an
    emulated dtype (bf16 without hardware support runs at ~1 GFLOP/s) cannot stall a command."""
    rates, start, sizes = [], time.perf_counter(), sorted(sizes)
    for i, n in enumerate(sizes):
        a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
        _sync(a @ b)  # warm-up: thread pool, packing buffers
        best = float("inf")
        for _ in range(repeats):
            tick = time.perf_counter()
            _sync(a @ b)
            best = min(best, time.perf_counter() - tick)
        rates.append(2 * n**3 / best)
        now = time.perf_counter()
        if budget_s is not None and i + 1 < len(sizes):
            next_cost = best * (repeats + 1) * (sizes[i + 1] / n) ** 3  # matmul time grows as n^3
            if next_cost > budget_s - (now - start):
                break
    return max(rates)


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
