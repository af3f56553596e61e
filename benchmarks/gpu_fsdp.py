"""FSDP2 on the GPUs at hand, through the kit's own `parallel.parallelize`: the paper's ablation size built on the meta
device, sharded over NCCL with App. A's bf16 all-gather and fp32 reduce, materialised shard by shard, with the Triton
kernels swapped in; then a few training steps (docs/scaling.md).

torchrun --nproc_per_node N benchmarks/gpu_fsdp.py [--steps 5] [--kernels triton] [--batch 8]
python benchmarks/gpu_fsdp.py --device cpu --kernels eager --tiny      # the same code over gloo, on a CPU

It prints, per rank: how many trainable parameters are DTensors and the local share, the dtype the blocks compute
in, each step's loss and time, and the peak memory; and whether the losses are finite and falling.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from gpu_model import Size, build_model, make_optimizer, paper_size, step_inputs, train_step
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from mos_lightning.parallel import Parallelism, parallelize

TINY = Size(width=64, depth=2, heads=2, patch_size=2, channels=4, tower_layers=3, tower_width=32, context=5,
            fusion={"router_width": 32, "router_depth": 1, "router_heads": 2}, latent=8)


def setup(device: str) -> tuple[int, int, torch.device]:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world)
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return rank, world, torch.device("cuda", torch.cuda.current_device())
    return rank, world, torch.device("cpu")


def sharded_model(size: Size, device: torch.device, world: int, kernels: str):
    with torch.device("meta"):
        model = build_model(size, "meta")
    mesh = init_device_mesh(device.type, (world,))
    parallelize(model, mesh, Parallelism(kernels=kernels, meta_init=True), device=device)
    return model.train()


def report_shards(model, rank: int) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    sharded = [p for p in trainable if isinstance(p, DTensor)]
    local = sum(p.to_local().numel() for p in sharded)
    print(f"rank {rank}: {len(sharded)}/{len(trainable)} trainable parameters are DTensors; local "
          f"{local:,} of {sum(p.numel() for p in trainable):,}; meta left: "
          f"{any(p.is_meta for p in model.parameters())}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--kernels", default="triton", choices=("eager", "triton"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="a tiny model instead of paper_ablation.yaml's")
    args = parser.parse_args()
    rank, world, device = setup(args.device)
    size = TINY if args.tiny else paper_size("paper_ablation")
    torch.manual_seed(0)
    model = sharded_model(size, device, world, args.kernels)
    report_shards(model, rank)
    optimizer = make_optimizer(model)
    x = step_inputs(size, args.batch, device, seed=rank)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    losses = []
    for step in range(args.steps):
        start = time.perf_counter()
        losses.append(train_step(model, optimizer, x, dtype).item())
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"rank {rank} step {step}: loss {losses[-1]:.5f}, {1e3 * (time.perf_counter() - start):.1f} ms",
              flush=True)
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else "n/a"
    finite = all(torch.isfinite(torch.tensor(losses)))
    print(f"rank {rank}: world {world}, kernels {args.kernels}, peak {peak}; losses finite {finite}, "
          f"last below first {losses[-1] < losses[0]}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
