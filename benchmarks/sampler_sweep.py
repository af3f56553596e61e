"""Sampler settings (CFG scale, Euler steps, timestep shift) for a trained run, chosen on a development prompt set.

python benchmarks/sampler_sweep.py RUN [--ckpt_path CKPT] [--cfg 2 3 4] [--steps 20 40] [--shift 1 2]

Every setting is scored (ShapesEval, CLIP, FID as the Evaluation callback scores them) on a prompt set drawn with
another seed than the held-out one (`--dev_seed`), so the choice does not tune on the set that reports the result.
The best setting on the development set by ShapesEval overall, and the run's own setting, are then scored once on
the held-out set (the Evaluation callback's default prompts). Sampling runs under the autocast `fit` would use.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
from common import compute, header

from mos_lightning.callbacks.evaluation import cached_clip, cached_fid
from mos_lightning.cli.sample import load_module, newest_checkpoint
from mos_lightning.evaluation.clip import mean_clip_score
from mos_lightning.evaluation.prompts import ShapesPrompts
from mos_lightning.evaluation.shapes_eval import PROMPT_SEED
from mos_lightning.evaluation.shapes_eval import score as shapes_score

CLIP = "shapes-clip"


def evaluate(module, prompts: ShapesPrompts, size: tuple[int, int], cfg: float, steps: int, shift: float,
             batch: int = 64) -> dict[str, float]:
    es = prompts.build(size)
    module.sample_shift = shift
    with torch.no_grad(), compute():
        images = torch.cat([module.generate(es.captions[i:i + batch], size, seed=i, steps=steps, cfg_scale=cfg)
                            .float() for i in range(0, len(es.captions), batch)])
    shapes = shapes_score(es.scenes, images)
    fid = cached_fid(f"open-clip:{CLIP}", None, CLIP, None, None).score(
        images, es.reference, data_id=es.data_id, categories=es.categories, reference_categories=es.categories)
    return {"overall": shapes["overall"], "single_object": shapes["single_object"],
            "clip": mean_clip_score(cached_clip(CLIP, None), images, es.captions), "fid": fid.value}


def row(label: str, cfg: float, steps: int, shift: float, m: dict) -> str:
    return (f"{label:<10} cfg {cfg:<4g} steps {steps:<3d} shift {shift:<4g} ShapesEval {m['overall']:.3f} "
            f"single_object {m['single_object']:.3f} CLIP {m['clip']:.2f} FID {m['fid']:.4f}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--ckpt_path", type=Path)
    parser.add_argument("--cfg", type=float, nargs="+", default=[2.0, 3.0, 4.0, 5.0])
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 40])
    parser.add_argument("--shift", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--per_category", type=int, default=24)
    parser.add_argument("--dev_seed", type=int, default=PROMPT_SEED + 1)
    parser.add_argument("--image_size", type=int, nargs=2, default=(32, 32))
    parser.add_argument("--raw", action="store_true", help="the raw weights, not the EMA, of a run that kept one")
    args = parser.parse_args(argv)
    if args.dev_seed == PROMPT_SEED:
        parser.error(f"--dev_seed must differ from the held-out prompt seed {PROMPT_SEED}")
    header()
    ckpt = args.ckpt_path or newest_checkpoint(args.run)
    module = load_module(args.run, ckpt)
    averaged = module.ema is not None and bool(module.ema.started)
    if averaged and args.raw:
        module.ema.swap()  # load_module put the EMA in; swap the raw weights back
    size = tuple(args.image_size)
    own = (module.cfg_scale, module.sample_steps, module.sample_shift)
    weights = "raw" if args.raw or not averaged else "EMA"
    print(f"run {args.run}, checkpoint {ckpt.name}, {weights} weights; the run's own setting: cfg {own[0]:g}, "
          f"steps {own[1]}, shift {own[2]:g}")
    dev = ShapesPrompts(args.per_category, args.dev_seed)
    print(f"development set: {len(dev)} prompts, seed {args.dev_seed}", flush=True)
    scored = {}
    for setting in itertools.product(args.cfg, args.steps, args.shift):
        scored[setting] = evaluate(module, dev, size, *setting)
        print(row("dev", *setting, scored[setting]), flush=True)
    best = max(scored, key=lambda s: (scored[s]["overall"], scored[s]["single_object"]))
    held_out = ShapesPrompts(args.per_category)
    print(f"held-out set: {len(held_out)} prompts, seed {PROMPT_SEED}")
    for label, setting in (("own", own), ("best dev", best)):
        print(row(label, *setting, evaluate(module, held_out, size, *setting)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
