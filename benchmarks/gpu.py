"""The kit's GPU figures: the Triton kernels against torch eager and torch.compile, a training step's time and MFU
at the paper's ablation size, and the MoS router's share of that step (docs/kernels.md, "GPU benchmark").

python benchmarks/gpu.py [--quick] [--json out.json] [--compile]

1. kernels: forward + backward in bf16 at the generation widths of experiments/scale/paper_ablation.yaml, mos_s.yaml
   and mos_l.yaml, on --tokens tokens: RMSNorm (TritonRMSNorm
   against nn.RMSNorm and torch.compile of it), the QK-norm (head width on the block's transposed q view), the SwiGLU
   activation alone (GB/s) and the whole SwiGLU FFN module (TFLOP/s) at the overlay's hidden width (ffn_multiple),
   and where that differs from int(8/3 D), the FFN at int(8/3 D) too (ffn_unaligned). L2 flushed before each call.
   Two times per call: the kernels' own (torch.profiler's kernel durations; the rates and speed-ups use it) and the
   wall time between CUDA events, which also holds the GPU's wait for the CPU's dispatch at these small sizes.
   GB/s counts the bytes a fused pass must move (norm: read x, dy, write y, dx = 5 rows; activation: read gate_up
   twice and dy, write out and d gate_up = 8 x hidden), so it compares with the copy bandwidth.
2. training: one step (flow loss forward + backward, AdamW step) under bf16 autocast with float32 parameters, of the
   ablation generation tower with MoS fusion as paper_ablation.yaml sets them, on 64x64 latents of 48 channels
   (1024 tokens). The frozen tower is a stand-in: random bf16 hidden states of Llama-3.2-3B's shape (29 states x 256
   tokens x 3072), as a step reads them from the state memo or disk cache and never runs the tower; the autoencoder
   is left out likewise (latents are cached). Variants (VARIANTS): eager, model.parallelism.kernels=triton
   (parallel.parallelize), unaligned (eager with every FFN hidden width at int(8/3 D) instead of the overlay's
   multiple of 128), and with --compile the regional compile (model.compile) of eager and of triton. FLOPs:
   FlopCounterMode over one forward + backward; MFU against the GPU's dense bf16 peak from gpu_model.BF16_PEAK
   (unknown GPUs: no MFU).
3. router: the fusion's router alone, forward + backward on the step's inputs, and the whole fusion (router, Eq. 4,
   Proj_j), each against the step's time; and the router's share of the step's FLOPs.

Every section runs in its own try/except (an error is printed and recorded, the rest still runs), and --json writes
every figure after each section, so a run cut short still leaves what it measured. Without CUDA it says it needs a GPU
and exits 0.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from dataclasses import asdict
from functools import partial

import torch
from gpu_model import (
    PAPER_SIZES,
    KernelCase,
    Report,
    Size,
    StepInputs,
    bf16_peak,
    build_model,
    count_flops,
    forward_backward,
    fusion_tokens,
    header,
    kernel_cases,
    make_optimizer,
    mfu,
    paper_size,
    router_pass,
    scale_model,
    step_inputs,
    train_step,
    unaligned,
)

from mos_lightning.model.text_to_image import TextToImage
from mos_lightning.parallel import Parallelism, parallelize

NEEDS_GPU = "benchmarks/gpu.py needs a GPU: torch.cuda.is_available() is False here, so nothing was measured"

# --- timing ----------------------------------------------------------------------------------------------------------

def cuda_ms(fn, warmup: int, repeats: int, flush: torch.Tensor | None = None) -> float:
    """Median milliseconds of fn() between two CUDA events: what a call costs the GPU's timeline, its idle time
    waiting for the CPU's dispatch included. `flush` is rewritten before each call to empty the L2 cache (as
    triton.testing.do_bench does)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        if flush is not None:
            flush.bitwise_not_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def kernel_ms(fn, repeats: int, flush: torch.Tensor) -> float:
    """Mean milliseconds per call of fn()'s GPU kernels alone (the profiler's kernel durations, the flush's left out):
    the kernels' own speed, whatever the CPU's dispatch costs."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    warnings.filterwarnings("ignore", message=".*Profiler clears events.*")  # one profile per call: no cycles
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            flush.bitwise_not_()
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA and "bitwise_not" not in e.name]
    if not kernels:
        raise RuntimeError("the profiler recorded no CUDA kernel")
    return sum(e.time_range.elapsed_us() for e in kernels) / repeats / 1e3


def time_case(case: KernelCase, warmup: int, repeats: int, flush: torch.Tensor) -> list[dict]:
    rows = []
    for impl, fn in case.impls.items():
        row = {"case": case.name, "width": case.width, "shape": case.shape, "impl": impl}
        try:
            row["wall_ms"] = cuda_ms(fn, warmup, repeats, flush)
            row["ms"] = kernel_ms(fn, repeats, flush)
        except Exception as error:  # one implementation failing (a compile, the profiler) leaves the others
            row["error"] = f"{type(error).__name__}: {error}"[:500]
        ms = row.get("ms")
        if ms:
            row.update(gb_s=case.bytes / ms / 1e6 if case.bytes else None,
                       tflop_s=case.flops / ms / 1e9 if case.flops else None)
        rows.append(row)
    return rows


# --- the sections ----------------------------------------------------------------------------------------------------

def matmul_rate(report: Report, args: argparse.Namespace) -> None:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = cuda_ms(lambda: a @ a, 3, 5 if args.quick else 20)
    report.data["matmul_8192_bf16_tflop_s"] = 2 * 8192**3 / ms / 1e9
    print(f"bf16 matmul 8192^3: {2 * 8192**3 / ms / 1e9:.0f} TFLOP/s measured (random data)")


def bench_kernels(report: Report, args: argparse.Namespace) -> None:
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    rows = report.data.setdefault("kernels", [])
    print(f"forward + backward, bf16, {args.tokens} tokens, L2 flushed before each call. kernel ms: the GPU kernels' "
          f"own time per call (profiler, mean of {args.repeats}), and the rates and speed-ups from it; wall ms: CUDA "
          f"events around each call (median of {args.repeats}), the CPU's dispatch included where the GPU waits for it")
    print(f"{'case':<12}{'width':>6}  {'shape':<26}{'kernel ms: eager':>17}{'compile':>9}{'triton':>9}   "
          f"{'eager':>7}{'compile':>8}{'triton':>8} {'unit':<8}{'vs eager':>9}{'vs comp':>8}   "
          f"{'wall ms: eager':>15}{'compile':>9}{'triton':>9}")
    for name in PAPER_SIZES:
        report.section(f"kernels at {name}.yaml's width", bench_width, rows, name, args, flush, banner=False)


def bench_width(rows: list[dict], name: str, args: argparse.Namespace, flush: torch.Tensor) -> None:
    gen = scale_model(name)["generation"]["init_args"]
    torch._dynamo.reset()  # each case compiles its own static graph, well inside the recompile limit
    for case in kernel_cases(gen["width"], gen["heads"], args.tokens, gen.get("ffn_multiple", 1)):
        case_rows = time_case(case, args.warmup, args.repeats, flush)
        rows.extend(case_rows)
        print_case(case_rows)


def print_case(rows: list[dict]) -> None:
    by = {r["impl"]: r for r in rows}
    first = rows[0]
    unit = "TFLOP/s" if first["case"] in ("swiglu_ffn", "ffn_unaligned") else "GB/s"
    key = "tflop_s" if unit == "TFLOP/s" else "gb_s"

    def cell(impl, field_, width, digits):
        value = by.get(impl, {}).get(field_)
        return f"{value:>{width}.{digits}f}" if value is not None else f"{'err':>{width}}"

    ms = {k: by[k].get("ms") for k in by}
    speed = [f"{ms['eager'] / ms['triton']:>8.2f}x" if ms.get("eager") and ms.get("triton") else f"{'-':>9}",
             f"{ms['compile'] / ms['triton']:>7.2f}x" if ms.get("compile") and ms.get("triton") else f"{'-':>8}"]
    impls = ("eager", "compile", "triton")
    print(f"{first['case']:<12}{first['width']:>6}  {first['shape']:<26}{cell('eager', 'ms', 17, 3)}"
          + cell("compile", "ms", 9, 3) + cell("triton", "ms", 9, 3) + "   " + cell("eager", key, 7, 0)
          + cell("compile", key, 8, 0) + cell("triton", key, 8, 0) + f" {unit:<8}" + "".join(speed) + "   "
          + cell("eager", "wall_ms", 15, 3) + "".join(cell(k, "wall_ms", 9, 3) for k in impls[1:]), flush=True)
    for r in rows:
        if "error" in r:
            print(f"    {r['impl']}: {r['error'][:300]}")


def make_variant(size: Size, variant: str):
    """The model of a VARIANTS entry on CUDA."""
    kernels, compile, odd = VARIANTS[variant]
    torch.manual_seed(0)
    model = build_model(unaligned(size) if odd else size, "cuda").train()
    return parallelize(model, None, Parallelism(kernels=kernels), compile=compile, device="cuda")


def bench_step(report: Report, args: argparse.Namespace, size: Size, variant: str) -> None:
    model = make_variant(size, variant)
    optimizer, x = make_optimizer(model), step_inputs(size, args.batch, "cuda")
    swapped = sum(type(m).__name__ in ("TritonRMSNorm", "TritonSwiGLU") for m in model.modules())
    training = report.data.setdefault("training", [])
    counted = report.data.setdefault("flops_per_step", {})  # by model: the overlay's FFN widths or int(8/3 x width)
    key = "unaligned" if VARIANTS[variant][2] else "overlay"
    if key not in counted:  # counting runs a forward + backward: it serves as a warm-up step too
        counted[key], _ = count_flops(partial(forward_backward, model, x))
        optimizer.zero_grad(set_to_none=True)
    flops = counted[key]
    torch.cuda.reset_peak_memory_stats()
    step_ms = cuda_ms(partial(train_step, model, optimizer, x), args.warmup, args.steps)
    peak = bf16_peak(torch.cuda.get_device_name())
    hidden = model.generation.blocks[0].ffn.down.in_features
    row = {"variant": variant, "batch": args.batch, "tokens": size.tokens, "swapped_modules": swapped,
           "ffn_hidden": hidden,
           "step_ms": step_ms, "samples_s": args.batch / step_ms * 1e3, "flops_per_step": flops,
           "tflop_s": flops / step_ms / 1e9, "mfu": mfu(flops, step_ms / 1e3, peak),
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    training.append(row)
    report.section(f"router share ({variant})", bench_router, row, model, x, args, banner=False)
    print_step(row)


def bench_router(row: dict, model: TextToImage, x: StepInputs, args: argparse.Namespace) -> None:
    """The router's and the whole fusion's forward + backward: milliseconds and FLOPs, and their shares of the step."""
    tokens = fusion_tokens(model, x)
    for name, whole in (("router", False), ("fusion", True)):
        fn = partial(router_pass, model, x, tokens, whole)
        flops, _ = count_flops(fn)
        ms = cuda_ms(fn, args.warmup, args.steps)
        model.zero_grad(set_to_none=True)
        tokens.grad = None
        row.update({f"{name}_ms": ms, f"{name}_share": ms / row["step_ms"], f"{name}_flops": flops,
                    f"{name}_flop_share": flops / row["flops_per_step"]})


def print_step(row: dict) -> None:
    mfu_text = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "unknown"
    router = "router: failed"
    if "fusion_ms" in row:
        router = (f"router {row['router_ms']:.1f} ms = {100 * row['router_share']:.1f}% of the step "
                  f"({100 * row['router_flop_share']:.1f}% of its FLOPs), whole fusion {row['fusion_ms']:.1f} ms = "
                  f"{100 * row['fusion_share']:.1f}% ({100 * row['fusion_flop_share']:.1f}%)")
    print(f"{row['variant']:<16} step {row['step_ms']:8.1f} ms  {row['samples_s']:6.1f} samples/s  "
          f"{row['tflop_s']:6.0f} TFLOP/s  MFU {mfu_text:>7}  peak {row['peak_memory_gib']:.1f} GiB  "
          f"swapped {row['swapped_modules']}, FFN hidden {row['ffn_hidden']}  {router}", flush=True)


def bench_training(report: Report, args: argparse.Namespace) -> None:
    size = paper_size("paper_ablation", args.latent)
    report.data["training_size"] = asdict(size)
    f = size.fusion
    print(f"paper_ablation.yaml: generation {size.width} wide, {size.depth} deep, {size.heads} heads, patch "
          f"{size.patch_size}, {size.channels} channels, {size.latent}x{size.latent} latents = {size.tokens} tokens; "
          f"MoS router {f.get('router_width')} x {f.get('router_depth')}, top_k {f.get('top_k')}; stand-in tower "
          f"states {size.tower_layers} x {size.context} x {size.tower_width} (random, bf16); batch {args.batch}, "
          f"AdamW, bf16 autocast; median of {args.steps} steps (CUDA events). FFN hidden widths rounded up to a "
          f"multiple of {size.ffn_multiple} (the overlay's ffn_multiple); unaligned: int(8/3 x width), as before it")
    variants = ["eager", "triton", "unaligned"] + (["compile", "triton+compile"] if args.compile else [])
    for variant in variants:
        report.section(f"training step ({variant})", bench_step, report, args, size, variant, banner=False)


SECTIONS = {"matmul": matmul_rate, "kernels": bench_kernels, "training": bench_training}


# name -> (model.parallelism.kernels, regional compile, FFN hidden widths int(8/3 x width) instead of the overlay's)
VARIANTS = {"eager": ("eager", False, False), "triton": ("triton", False, False),
            "unaligned": ("eager", False, True), "compile": ("eager", True, False),
            "triton+compile": ("triton", True, False)}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps")
    parser.add_argument("--json", metavar="PATH", help="write every figure here (after each section)")
    parser.add_argument("--compile", action="store_true", help="also time the regional compile of the step "
                        "(model.compile), eager and triton: a cold compile each, minutes")
    parser.add_argument("--tokens", type=int, default=4 * 1024, help="rows of the kernel benchmarks (4 x 1024)")
    parser.add_argument("--batch", type=int, default=8, help="training step batch size")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64: 1024 tokens at patch 2)")
    parser.add_argument("--sections", default="matmul,kernels,training", help="comma-separated subset to run")
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"--sections: unknown {', '.join(sorted(unknown))}; allowed {', '.join(SECTIONS)}")
    args.warmup, args.repeats, args.steps = (2, 10, 3) if args.quick else (5, 50, 10)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    report = Report(args.json, args)
    if not torch.cuda.is_available():
        print(NEEDS_GPU)
        report.data["cuda"] = False
        report.write()
        return 0
    report.data["cuda"] = True
    header(report)
    for name in args.sections.split(","):
        report.section(name, SECTIONS[name], report, args)
    report.write()
    print(f"\ndone in {report.data['wall_s']:.0f} s, {len(report.data['errors'])} section error(s)"
          + (f"; figures in {args.json}" if args.json else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
