"""Every fusion strategy at the embedded size and at a ~10x larger generation tower.

python benchmarks/strategies.py [--steps 5]

Per strategy: trainable parameters; training-step time (forward, backward, AdamW step) at the
precision `fit` chooses here; sampling time per denoising step (one model call, batch 8, eval); peak RSS of a
fresh process that runs only that strategy; for MoS the router's share of the step (its own
forward + backward). Beside them, the step's FLOPs from the formula in `flops.py` and the
achieved FLOP/s as a fraction of this CPU's measured matmul peak in that precision. The frozen tower is
memoised in training and left out of the FLOPs.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch
from common import compute, header, matmul_peak, median_seconds, precision
from flops import training_flops

from mos_lightning.cli import MoSCLI

ROOT = Path(__file__).resolve().parents[1]
FUSION = "mos_lightning.model.fusion."
MOS_ARGS = {"inputs": ["prompt", "latent", "timestep"], "top_k": 2, "epsilon": 0.05}
STRATEGIES = {  # name -> (fusion class, init_args)
    "mos": ("MoSFusion", MOS_ARGS),
    "hand_crafted": ("HandCraftedFusion", {"layers": None}),
    "cross_attn": ("CrossAttentionFusion", {"layer": -1}),
    "self_attn": ("SelfAttentionFusion", {"layer": -1}),
    "kv_mos": ("KeyValueMoSFusion", MOS_ARGS),
    "mot": ("MoTFusion", {}),
}
# generation FFN ratio that puts cross/self-attention within ~1 % of MoS's trainable parameters
MLP_RATIO = {("cross_attn", "embedded"): 3.25, ("self_attn", "embedded"): 5.25,
             ("cross_attn", "10x"): 2.25, ("self_attn", "10x"): 4.25}
SIZES = {"embedded": {"width": 192, "depth": 6, "heads": 6}, "10x": {"width": 576, "depth": 6, "heads": 9},
         "symmetric": {"width": 384, "depth": 6, "heads": 12}}  # MoT needs the tower's geometry


def build(strategy: str, size: str, batch: int):
    cls, init_args = STRATEGIES[strategy]
    generation = {"class_path": "mos_lightning.model.generation.GenerationTower",
                  "init_args": {**SIZES[size], "mlp_ratio": MLP_RATIO.get((strategy, size), 4.0)}}
    args = ["--trainer.logger=false", f"--data.init_args.batch_size={batch}",
            f"--model.fusion={json.dumps({'class_path': FUSION + cls, 'init_args': init_args})}",
            f"--model.generation={json.dumps(generation)}"]
    cli = MoSCLI(args=args, run=False)
    cli.model.configure_model()  # compiles, as a trainer would (model.compile)
    return cli.model, next(iter(cli.datamodule.train_dataloader()))


def measure(strategy: str, size: str, steps: int, batch: int = 32) -> dict:
    module, data = build(strategy, size, batch)
    model, n = module.model, len(data)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    t = torch.rand(n)

    def step():
        with compute():
            loss = module.loss(data, t).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    states = model.states(data.captions)
    z = torch.randn_like(data.images[:8])

    @torch.no_grad()
    def sample_step():
        small = type(states)(states.hidden[:8], states.mask[:8],
                             None if states.keys_values is None else states.keys_values[:8])
        with compute():
            model(z, t[:8], small)

    result = {"strategy": strategy, "size": size, "params": model.trainable_parameters(),
              "step_s": median_seconds(step, steps), "sample_step_s": median_seconds(sample_step, steps),
              "flops": training_flops(model, data, states)}
    router = getattr(model.fusion, "router", None)
    if router is not None:
        tokens = model.generation.patchify(data.images).detach()

        def router_step():
            with compute():
                router(states, tokens, t).float().sum().backward()

        result["router_s"] = median_seconds(router_step, steps)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def table(rows: list[dict], peak: float) -> None:
    print(f"matmul peak, best of the runs' first and last: {peak / 1e9:.1f} GFLOP/s")
    print("| strategy | size | trainable params | step ms | sample step ms | router share | peak RSS GB | "
          "GFLOP/step | GFLOP/s | of peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        share = f"{100 * r['router_s'] / r['step_s']:.1f}%" if "router_s" in r else ""
        rate = r["flops"] / r["step_s"]
        print(f"| {r['strategy']} | {r['size']} | {r['params']:,} | {1e3 * r['step_s']:.0f} | "
              f"{1e3 * r['sample_step_s']:.1f} | {share} | {r['peak_rss_gb']:.2f} | {r['flops'] / 1e9:.1f} | "
              f"{rate / 1e9:.1f} | {rate / peak:.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--one", nargs=2, metavar=("STRATEGY", "SIZE"), help="measure one, print JSON (internal)")
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(*args.one, steps=args.steps)))
        return
    peak = header()  # measured first, on a quiet machine, and again at the end
    runs = [(s, z) for s in STRATEGIES if s != "mot" for z in ("embedded", "10x")]
    runs += [("mot", "symmetric"), ("mos", "symmetric")]
    rows = []
    for strategy, size in runs:  # a fresh process each, so peak RSS is that strategy's own
        out = subprocess.run([sys.executable, __file__, "--one", strategy, size, "--steps", str(args.steps)],
                             capture_output=True, text=True, cwd=Path(__file__).parent)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{strategy} {size} failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(line[7:]))
        print(f"  measured {strategy} at {size}", file=sys.stderr)
    table(rows, max(peak, matmul_peak(precision()[1])))
    step = {(r["strategy"], r["size"]): r["step_s"] for r in rows}
    for size in ("embedded", "10x"):
        print(f"MoS / cross-attention step time at {size}: {step[('mos', size)] / step[('cross_attn', size)]:.2f}x")


if __name__ == "__main__":
    main()
