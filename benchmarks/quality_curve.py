"""ShapesEval (and CLIP, FID) against training FLOPs, for finished runs.

python benchmarks/quality_curve.py RUN [RUN ...]

RUN is one run's folder (`runs/<experiment>/<arm>[/seed<k>]`, holding `config.yaml` and the event files). The
FLOPs of a training step come from the kit's own count (`mos_lightning.budget.arm_work`: torch's FLOP counter on
the trainable forward, x3 for the backward) on the run's saved config, rebuilt without training. The frozen
understanding tower (memoised) and a REPA encoder's forward are not counted. Values are those logged at each
validation; runs with the Evaluation callback at every validation (experiments/quality.yaml) give a full curve.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml
from common import header
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TAGS = ("val/shapes/overall", "val/shapes/single_object", "val/clip", "val/fid", "val/loss")


def train_flops_per_step(run: Path) -> float:
    from mos_lightning.budget import arm_work
    from mos_lightning.cli.base import MoSCLI
    from mos_lightning.cli.sample import FIT_ONLY, check_trusted

    config = yaml.safe_load((run / "config.yaml").read_text())
    for key in FIT_ONLY:
        config.pop(key, None)
    check_trusted(config, run / "config.yaml")  # rebuilding instantiates what the file names
    cli = MoSCLI(args=config, run=False, announce=False)
    work = arm_work(cli.model, cli.datamodule, cli.trainer, cli.trainer.callbacks, first=False)
    return work.train_flops / cli.trainer.max_steps


def scalars(run: Path) -> dict[int, dict[str, float]]:
    """{step: {tag: value}} over every event file of the run (a later file wins for the same step)."""
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    found: dict[int, dict[str, float]] = {}
    for tag in TAGS:
        if tag in events.Tags()["scalars"]:
            for event in events.Scalars(tag):
                found.setdefault(event.step, {})[tag] = event.value
    return dict(sorted(found.items()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # the rebuilt CLI parses its config dict, not this script's arguments
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    header()
    for run in args.runs:
        if not (run / "config.yaml").is_file():
            sys.exit(f"{run}: no config.yaml (expected a run folder written by `fit`)")
        per_step = train_flops_per_step(run)
        print(f"\n{run}: {per_step / 1e9:.1f} GFLOP per training step")
        print("| step | train PFLOP | " + " | ".join(TAGS) + " |")
        print("|---" * (len(TAGS) + 2) + "|")
        for step, values in scalars(run).items():
            if not any(t in values for t in TAGS[:2]):
                continue  # a validation without the evaluation
            cells = " | ".join(f"{values[t]:.4f}" if t in values else "" for t in TAGS)
            print(f"| {step} | {step * per_step / 1e15:.3f} | {cells} |")


if __name__ == "__main__":
    main()
