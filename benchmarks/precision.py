"""A default training step under bf16 autocast against float32, interleaved in one process.

python benchmarks/precision.py [--repeats 3]

Why `fit` picks the precision from the hardware: on a CPU without native bf16 the bf16 matmuls are emulated.
The step is forward + backward of the flow loss at the base config's batch (32), eager, tower in float32 for
both (the frozen tower's dtype is a separate choice, memoised in training).
"""
from __future__ import annotations

import argparse

import torch
from common import header, interleaved_medians

from mos_lightning.cli import MoSCLI


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    header()
    cli = MoSCLI(args=["--trainer.logger=false", "--model.compile=false", "--trainer.precision=32-true",
                       "--model.understanding.init_args.dtype=float32"], run=False, announce=False)
    module = cli.model.train()
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.train_dataloader()))
    t = torch.rand(len(batch))

    def step(dtype):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                loss = module.loss(batch, t).mean()
            loss.backward()
        return run

    times = interleaved_medians({"bf16": step(torch.bfloat16), "fp32": step(torch.float32)}, args.repeats, warmup=1)
    print(f"training step, batch {len(batch)}, eager: bf16 autocast {times['bf16']:.2f} s, "
          f"float32 {times['fp32']:.2f} s, ratio {times['bf16'] / times['fp32']:.1f}x (median of {args.repeats})")


if __name__ == "__main__":
    main()
