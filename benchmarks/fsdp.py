"""FSDP2 on 2 CPU processes (gloo) against one process and against DDP: the same losses at the same global
batch, and what sharding saves per rank.

python benchmarks/fsdp.py [--steps 20] [--sizes embedded,10x] [--quick]
    [--parts equivalence,cost] [--precisions float32,default] [--batch 32] [--workdir DIR]

Every fit is `python -m mos_lightning fit --config experiments/router_inputs.yaml --arm prompt` in a subprocess,
model.compile off, validation and checkpoints off, with an overlay written to a temporary folder and the
callback `fsdp_probe.FsdpProbe` (this folder on PYTHONPATH) writing each rank's figures as JSON. The global
batch is the same in every layout: one process takes `--batch` samples a step, each of 2 processes half. The
train sampler (BucketBatchSampler) dispatches batch_size x num_replicas indices a step and rank r takes the r-th
slice, so the two ranks' batches together are the one-process batch, sample for sample (checked, and printed).
The module keys its training randomness by (seed, step, rank), which would give rank 1 other timesteps and
noise than the second half of the one-process batch; the probe draws them per global-batch row instead
(fsdp_probe.py), the same in every layout, so what differs is only how the step is computed.

1. Equivalence: the first --steps losses of one process and of FSDP2 (mean over the ranks of each rank's loss:
   the global-batch loss, the ranks' batches being equal in size), with DDP beside them for the difference a
   split batch alone makes; in float32 (trainer 32-true, float32 tower, FSDP2 gathering in float32) and at the
   kit's default precision (bf16-mixed where bf16 is native; FSDP2 gathers in bf16, reduces in fp32).
2. Cost, at the default precision, per size: median step time (steps after the first; wall time from the
   start of a batch to its end, forward, backward, gradient sync, clip and AdamW), per-rank peak RSS over
   training (the process's VmHWM, reset when training starts) and over the whole process, and the bytes each
   rank holds of trainable parameters and AdamW states (local shards under FSDP2), with FSDP2's over DDP's.
   "10x" is the generation tower at width 640, depth 6, 10 heads (the embedded one: 192, 6, 6).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from common import header

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EXPERIMENT = ROOT / "experiments" / "router_inputs.yaml"
FSDP_CPU = ROOT / "experiments" / "scale" / "fsdp_cpu.yaml"
ARM = "prompt"
SIZES = {"embedded": {}, "10x": {"width": 640, "depth": 6, "heads": 10}}  # generation tower overrides
FLOAT32 = ["--trainer.precision=32-true", "--model.understanding.init_args.dtype=float32",
           "--model.parallelism.param_dtype=float32"]
LAYOUTS = ("1 process", "DDP", "FSDP2")
EQUIVALENCE = {"float32": "float32 (32-true, float32 tower, FSDP2 gathers in float32)",
               "default": "default precision (FSDP2 gathers in bf16, reduces in fp32)"}
DDP = {"trainer": {"accelerator": "cpu", "devices": 2, "strategy": {
    "class_path": "lightning.pytorch.strategies.DDPStrategy", "init_args": {"process_group_backend": "gloo"}}}}


def fit(work: Path, name: str, layout: str, steps: int, batch: int, extra: list[str]) -> list[dict]:
    """One fit in a subprocess; returns its ranks' probe records."""
    probe = work / name
    overlay = {"trainer": {"max_steps": steps, "limit_val_batches": 0, "enable_checkpointing": False,
                           "log_every_n_steps": max(steps, 1), "callbacks": [
                               {"class_path": "fsdp_probe.FsdpProbe", "init_args": {"path": str(probe)}}]}}
    (work / f"{name}.yaml").write_text(yaml.safe_dump(overlay))
    configs = ["--config", str(EXPERIMENT)]
    if layout == "DDP":
        (work / "ddp.yaml").write_text(yaml.safe_dump(DDP))
        configs += ["--config", str(work / "ddp.yaml")]
    elif layout == "FSDP2":
        configs += ["--config", str(FSDP_CPU)]
    configs += ["--config", str(work / f"{name}.yaml")]
    ranks = 1 if layout == "1 process" else 2
    single = ["--trainer.accelerator=cpu", "--trainer.devices=1"] if ranks == 1 else []
    cmd = [sys.executable, "-m", "mos_lightning", "fit", *configs, "--arm", ARM, "--model.compile=false",
           f"--data.init_args.batch_size={batch // ranks}", f"--trainer.logger.init_args.save_dir={work / name}",
           *single, *extra]
    path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed (exit {done.returncode}):\n{' '.join(cmd)}\n{done.stderr[-4000:]}")
    print(f"  ran {name}", file=sys.stderr, flush=True)
    return [json.loads((work / f"{name}.rank{r}.json").read_text()) for r in range(ranks)]


def global_losses(ranks: list[dict]) -> list[float]:
    """Per step, the mean over ranks of each rank's batch-mean loss (equal batches: the global-batch loss)."""
    per_rank = [[s["loss"] for s in r["steps"]] for r in ranks]
    return [sum(values) / len(values) for values in zip(*per_rank)]


def global_samples(ranks: list[dict]) -> list[list[str]]:
    """Per step, the ranks' samples in rank order: the global batch."""
    return [sum(batches, []) for batches in zip(*[[s["samples"] for s in r["steps"]] for r in ranks])]


def same_samples(runs: dict[str, list[dict]]) -> str:
    reference = global_samples(runs["1 process"])
    lines = []
    for layout in LAYOUTS[1:]:
        got = global_samples(runs[layout])
        bad = [i for i, (a, b) in enumerate(zip(reference, got)) if a != b]
        same_sets = all(sorted(a) == sorted(b) for a, b in zip(reference, got))
        lines.append(f"{layout}: {'the same samples in the same order' if not bad else 'DIFFERENT samples'} as one "
                     f"process at all {len(reference)} steps" + ("" if not bad else
                                                                  f" (steps {bad[:5]}; same sets: {same_sets})"))
    return "; ".join(lines)


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def describe(ranks: list[dict]) -> str:
    r = ranks[0]
    return f"{r['strategy']}, {r['precision']}, blocks compute in {r['block_dtype']}, {r['threads']} thread(s)/rank"


def equivalence(label: str, runs: dict[str, list[dict]]) -> None:
    print(f"\n### Equivalence, {label}: loss of the global batch per step")
    for layout in LAYOUTS:
        print(f"- {layout}: {describe(runs[layout])}")
    fsdp = runs["FSDP2"]
    print(f"- FSDP2: {fsdp[0]['sharded']}/{fsdp[0]['parameters']} trainable parameters sharded (DTensors); "
          f"samples: {same_samples(runs)}")
    losses = {layout: global_losses(runs[layout]) for layout in LAYOUTS}
    ref = losses["1 process"]
    print("\n| step | 1 process | FSDP2 | FSDP2 rel. diff | DDP | DDP rel. diff |")
    print("|---:|---:|---:|---:|---:|---:|")
    worst = {"FSDP2": 0.0, "DDP": 0.0}
    for step, one in enumerate(ref):
        f, d = losses["FSDP2"][step], losses["DDP"][step]
        worst = {"FSDP2": max(worst["FSDP2"], relative(f, one)), "DDP": max(worst["DDP"], relative(d, one))}
        print(f"| {step} | {one:.7f} | {f:.7f} | {relative(f, one):.2e} | {d:.7f} | {relative(d, one):.2e} |")
    print(f"\nmax relative difference over {len(ref)} steps, {label}: FSDP2 {worst['FSDP2']:.2e}, "
          f"DDP {worst['DDP']:.2e}", flush=True)


def median_step_ms(ranks: list[dict]) -> float:
    """The slowest rank's median step (the ranks wait on each other), the first step (lazy init) left out."""
    return max(1e3 * statistics.median([s["seconds"] for s in r["steps"][1:] or r["steps"]]) for r in ranks)


def held_bytes(ranks: list[dict]) -> int:
    """Trainable parameters + AdamW states of the rank holding the most (local shards under FSDP2)."""
    return max(r["param_bytes"] + r["optimizer_bytes"] for r in ranks)


def mb(n: float) -> str:
    return f"{n / 2**20:.1f}"


def cost(rows: dict[tuple[str, str], list[dict]], sizes: list[str]) -> None:
    print("\n### Cost per rank, default precision")
    print("\n| size | layout | trainable params | median step ms | peak RSS in training MB (per rank) | "
          "peak RSS of the process MB | params MB | AdamW states MB | params + AdamW MB | of DDP's |")
    print("|---|---|---:|---:|---|---|---:|---:|---:|---:|")
    for size in sizes:
        held = {layout: held_bytes(rows[(size, layout)]) for layout in LAYOUTS}
        for layout in LAYOUTS:
            ranks = rows[(size, layout)]
            train_peak = " / ".join(mb(1024 * r["peak_rss_train_kb"]) if r["peak_rss_train_kb"] else "n/a"
                                    for r in ranks)
            peak = " / ".join(mb(1024 * max(r["peak_rss_kb"], r["peak_rss_before_train_kb"])) for r in ranks)
            params = max(r["param_bytes"] for r in ranks)
            states = max(r["optimizer_bytes"] for r in ranks)
            ratio = f"{held[layout] / held['DDP']:.3f}" if layout != "1 process" else ""
            print(f"| {size} | {layout} | {ranks[0]['trainable_params']:,} | {median_step_ms(ranks):.0f} | "
                  f"{train_peak} | {peak} | {mb(params)} | {mb(states)} | {mb(held[layout])} | {ratio} |")
    for size in sizes:
        f, d, one = rows[(size, "FSDP2")], rows[(size, "DDP")], rows[(size, "1 process")]
        local = " / ".join(f"{r['local_params']:,}" for r in f)
        print(f"{size}: FSDP2 holds {local} of {f[0]['trainable_params']:,} trainable parameters per rank; "
              f"params + AdamW per rank, FSDP2 / DDP = {held_bytes(f) / held_bytes(d):.3f}; "
              f"step time FSDP2 / DDP = {median_step_ms(f) / median_step_ms(d):.2f}, "
              f"FSDP2 / 1 process = {median_step_ms(f) / median_step_ms(one):.2f}")
    print("(params + AdamW: this rank's local tensors, the largest rank; DDP's gradient buckets, the gradients, "
          "activations and the frozen tower are in the RSS only)", flush=True)


def size_args(size: str) -> list[str]:
    return [f"--model.generation.init_args.{k}={v}" for k, v in SIZES[size].items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sizes", default="embedded,10x", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--batch", type=int, default=32, help="global batch (even); each of 2 ranks takes half")
    parser.add_argument("--parts", default="equivalence,cost", help="comma-separated: equivalence, cost")
    parser.add_argument("--precisions", default="float32,default",
                        help="comma-separated, the equivalence's: float32, default")
    parser.add_argument("--quick", action="store_true", help="3 steps: a smoke run")
    parser.add_argument("--workdir", help="keep the fits' overlays, logs and probe files here (default: a temp dir)")
    args = parser.parse_args()
    steps = 3 if args.quick else args.steps
    sizes = [s for s in args.sizes.split(",") if s]
    parts = {p for p in args.parts.split(",") if p}
    precisions = [p for p in args.precisions.split(",") if p]
    unknown = [s for s in sizes if s not in SIZES] + sorted(parts - {"equivalence", "cost"})
    if unknown := unknown + [p for p in precisions if p not in EQUIVALENCE]:
        raise SystemExit(f"unknown --sizes/--parts/--precisions: {unknown}")
    if args.batch % 2 or steps < 2:
        raise SystemExit("--batch must be even and --steps at least 2")
    header()
    print(f"experiment {EXPERIMENT.relative_to(ROOT)}, arm {ARM}, model.compile false; global batch {args.batch} "
          f"(2 processes: {args.batch // 2} each), {steps} steps; OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset (Lightning gives each of 2 ranks half the cores)')}", flush=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fsdp-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        runs: dict[tuple[str, str], list[dict]] = {}

        def get(size: str, layout: str, precision: str) -> list[dict]:
            key = (f"{size}-{precision}", layout)
            if key not in runs:
                name = f"{size}-{precision}-{layout.replace(' ', '')}"
                extra = size_args(size) + (FLOAT32 if precision == "float32" else [])
                runs[key] = fit(work, name, layout, steps, args.batch, extra)
            return runs[key]

        if "equivalence" in parts:
            for precision in precisions:
                equivalence(EQUIVALENCE[precision], {layout: get("embedded", layout, precision) for layout in LAYOUTS})
        if "cost" in parts:
            rows = {(size, layout): get(size, layout, "default") for size in sizes for layout in LAYOUTS}
            for size in sizes:
                if SIZES[size]:
                    n, base = rows[(size, "1 process")][0]["trainable_params"], None
                    if ("embedded", "1 process") in rows:
                        base = rows[("embedded", "1 process")][0]["trainable_params"]
                    times = f" ({n / base:.1f}x the embedded {base:,})" if base else ""
                    print(f"\n{size}: generation tower {SIZES[size]}: {n:,} trainable parameters{times}")
            cost(rows, sizes)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
