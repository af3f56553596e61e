"""`python -m mos_lightning fit --config experiments/X.yaml [--arm NAME] [--seeds 0,1,2]`: train every arm of
an ablation (once per seed).

Before the first step it prints the machine, the precision chosen, the measured matmul rate and the
predicted wall time of the whole command; at the end, the table with predicted and actual seconds.
"""
from __future__ import annotations

import dataclasses
import sys

import torch

from ..budget import Plan, arm_work, minutes
from ..errors import ConfigError
from ..machine import describe_cpu, matmul_peak
from ..results import check_paper
from .arms import arm_args, read_experiment, run_arms, run_name, run_order, select_arms, with_arm
from .base import MoSCLI, check_image_size, pop_option

MAX_SEED = 2**32 - 1  # Lightning's seed_everything takes numpy's uint32 range
SEEDS_ALLOWED = f"distinct integers 0..{MAX_SEED}, comma-separated, e.g. --seeds 0,1,2"


def parse_seeds(text: str | None) -> list[int] | None:
    """`--seeds 0,1,2` -> [0, 1, 2]; None when not given (one run per arm, the config's seed_everything)."""
    if text is None:
        return None
    if not text.strip():
        raise ConfigError(f"--seeds is empty; allowed: {SEEDS_ALLOWED}")
    seeds = []
    for part in text.split(","):
        part = part.strip()
        if not part.lstrip("-").isdecimal():
            raise ConfigError(f"--seeds {text!r}: {part!r} is not an integer; allowed: {SEEDS_ALLOWED}")
        seed = int(part)
        why = _seed_problem(seed, seeds)
        if why:
            raise ConfigError(f"--seeds {text!r}: {seed} {why}; allowed: {SEEDS_ALLOWED}")
        seeds.append(seed)
    return seeds


def _seed_problem(seed: int, earlier: list[int]) -> str:
    if seed < 0:
        return "is negative"
    if seed > MAX_SEED:
        return "is too large"
    return "is repeated" if seed in earlier else ""


def pop_seeds(args: list[str]) -> tuple[list[int] | None, list[str]]:
    text, args = pop_option(args, "--seeds")
    if "--seeds" in args:  # the last word, with no value after it
        raise ConfigError(f"--seeds needs a value; allowed: {SEEDS_ALLOWED}")
    seeds = parse_seeds(text)
    if seeds is not None and any(a.startswith("--seed_everything") for a in args):
        raise ConfigError("--seeds sets seed_everything for each run; drop --seed_everything")
    return seeds, args


def fit_main(args: list[str]) -> list[dict]:
    arm, args = pop_option(args, "--arm", "--experiment.arm")
    seeds, args = pop_seeds(args)
    experiment = read_experiment(args)
    check_paper(experiment.get("paper"), experiment.get("arms") or {"default": {}})
    arms = select_arms(experiment, arm)
    if any(a.startswith("--ckpt_path") for a in args):
        if len(arms) > 1:
            raise ConfigError(f"--ckpt_path resumes one arm; add --arm NAME (arms: {', '.join(arms)})")
        if seeds is not None and len(seeds) > 1:
            raise ConfigError(f"--ckpt_path resumes one run; give one seed (--seeds K), not --seeds "
                              f"{','.join(map(str, seeds))}")
    printing = any(a.startswith("--print_config") for a in args)
    plan = None if printing else make_plan(args, arms, experiment, seeds)
    rows = run_arms(args, arms, experiment, plan, seeds)
    if plan is not None and rows:
        actual = sum(float(row["wall_s"]) for row in rows)
        print(f"wall time: {minutes(actual)} against {minutes(plan.total)} predicted "
              f"({actual / max(plan.total, 1e-9):.2f}x)", file=sys.stderr)
    return rows


def make_plan(args: list[str], arms: dict[str, dict], experiment: dict, seeds: list[int] | None = None) -> Plan:
    """Build each arm once (no step run), count its work, and predict the command's wall time: each arm's
    work once per seed (a seed changes the weights, not the work)."""
    _, args = pop_option(args, "--ckpt_path")  # a `fit` option; the work counted is the whole arm's
    plan, works = None, {}
    for name, overrides in arms.items():
        cli = MoSCLI(args=with_arm(args, arm_args(name, overrides, experiment)), run=False, announce=plan is None)
        check_image_size(cli.model, cli.datamodule)  # a clear error before a forward fails on the size
        if plan is None:
            plan = Plan(measure_rate(cli.trainer))
        works[name] = arm_work(cli.model, cli.datamodule, cli.trainer, cli.trainer.callbacks, not works)
    for i, (name, seed) in enumerate(run_order(arms, seeds)):
        # only the command's first run pays the cold compile; later seeds of that arm hit inductor's cache
        plan.add(run_name(name, seed), works[name] if i == 0 else dataclasses.replace(works[name], compile_s=0.0))
    if seeds is None:
        each = ", ".join(f"{name} {minutes(seconds)}" for name, seconds in plan.arms.items())
        print(f"predicted wall time: {minutes(plan.total)} for {len(plan.arms)} arm(s) ({each})", file=sys.stderr)
    else:
        each = ", ".join(f"{name} {minutes(works[name].seconds(plan.rate))}" for name in arms)
        print(f"predicted wall time: {minutes(plan.total)} for {len(arms)} arm(s) x {len(seeds)} seed(s) "
              f"({each}, each run)", file=sys.stderr)
    return plan


def measure_rate(trainer) -> float:
    """This machine's matmul rate in the dtype the trainer computes in, well under a second."""
    dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
    device = trainer.strategy.root_device.type
    rate = matmul_peak(dtype, sizes=(512, 1024), repeats=3, budget_s=1.0, device=device)
    where = describe_cpu() if device == "cpu" else torch.cuda.get_device_name()
    print(f"machine: {where}; precision {trainer.precision}; {str(dtype).removeprefix('torch.')} matmul "
          f"{rate / 1e9:.1f} GFLOP/s", file=sys.stderr)
    return rate
