"""Training throughput per arm of an ablation, and the MoS router's share of a training step.

python benchmarks/train_throughput.py [experiments/router_inputs.yaml] [--steps 10]

A step is forward + backward of the flow loss at the precision `fit` chooses on this machine, on a
batch from the configured DataModule. The router's share is the router's own forward + backward
on the same inputs, over the step's time. With `model.compile` on (the base config), the same step
is also timed with compilation switched off (torch.compiler.set_stance("force_eager")), interleaved
with the compiled one, and the speed-up printed; the first compiled call (the compile) is warm-up.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from common import compute, header, interleaved_medians

from mos_lightning.cli import MoSCLI, arm_args, read_experiment

ROOT = Path(__file__).resolve().parents[1]


def build(config: str, name: str, overrides: dict, experiment: dict):
    cli = MoSCLI(args=["--config", config, *arm_args(name, overrides, experiment), "--trainer.logger=false"], run=False)
    cli.datamodule.setup("fit")
    cli.model.configure_model()  # compiles, as a trainer would (model.compile)
    return cli.model, next(iter(cli.datamodule.train_dataloader()))


def measure(module, batch, steps: int) -> dict:
    """Median seconds of a training step, of the router's share of it, and (compiled models) of the eager step."""
    model = module.model
    n = len(batch)
    t = torch.rand(n)
    module.train()

    def step():
        with compute():
            loss = module.loss(batch, t).mean()
        loss.backward()

    states = model.states(batch.captions)
    tokens = model.generation.patchify(batch.images).detach()

    def router():
        with compute():
            logits = model.fusion.router(states, tokens, t)
        logits.float().sum().backward()

    def eager_step():
        with torch.compiler.set_stance("force_eager"):
            step()

    fns = {"step": step, "router": router}
    if module.hparams.compile:
        fns["eager"] = eager_step
    return interleaved_medians(fns, steps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", nargs="?", default=str(ROOT / "experiments" / "router_inputs.yaml"))
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    experiment = read_experiment(["--config", args.config])
    header()
    print(f"config {args.config}")
    print(f"{'arm':<26}{'params':>10}{'step ms':>10}{'samples/s':>11}{'router ms':>11}{'router %':>10}"
          f"{'eager ms':>10}{'compiled':>10}")
    for name, overrides in (experiment["arms"] or {"default": {}}).items():
        module, batch = build(args.config, name, overrides, experiment)
        times = measure(module, batch, args.steps)
        step, router, eager = times["step"], times["router"], times.get("eager")
        params = module.model.trainable_parameters()
        compiled = f"{eager * 1e3:>10.1f}{eager / step:>9.2f}x" if eager else f"{'-':>10}{'-':>10}"
        print(f"{name:<26}{params:>10,}{step * 1e3:>10.1f}{len(batch) / step:>11.1f}{router * 1e3:>11.1f}"
              f"{100 * router / step:>9.1f}%{compiled}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
