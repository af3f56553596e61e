"""`python -m mos_lightning fit --config experiments/X.yaml [--arm NAME]`: train every arm of an ablation.

Before the first step it prints the machine, the precision chosen, the measured matmul rate and the
predicted wall time of the whole command; at the end, the table with predicted and actual seconds.
"""
from __future__ import annotations

import sys

import torch

from ..budget import Plan, arm_work, minutes
from ..errors import ConfigError
from ..machine import describe_cpu, matmul_peak
from .arms import arm_args, read_experiment, run_arms, select_arms, with_arm
from .base import MoSCLI, check_image_size, pop_option


def fit_main(args: list[str]) -> list[dict]:
    arm, args = pop_option(args, "--arm", "--experiment.arm")
    experiment = read_experiment(args)
    arms = select_arms(experiment, arm)
    if len(arms) > 1 and any(a.startswith("--ckpt_path") for a in args):
        raise ConfigError(f"--ckpt_path resumes one arm; add --arm NAME (arms: {', '.join(arms)})")
    printing = any(a.startswith("--print_config") for a in args)
    plan = None if printing else make_plan(args, arms, experiment)
    rows = run_arms(args, arms, experiment, plan)
    if plan is not None and rows:
        actual = sum(float(row["wall_s"]) for row in rows)
        print(f"wall time: {minutes(actual)} against {minutes(plan.total)} predicted "
              f"({actual / max(plan.total, 1e-9):.2f}x)", file=sys.stderr)
    return rows


def make_plan(args: list[str], arms: dict[str, dict], experiment: dict) -> Plan:
    """Build each arm (no step run), count its work, and predict the command's wall time."""
    _, args = pop_option(args, "--ckpt_path")  # a `fit` option; the work counted is the whole arm's
    plan = None
    for name, overrides in arms.items():
        cli = MoSCLI(args=with_arm(args, arm_args(name, overrides, experiment)), run=False, announce=plan is None)
        check_image_size(cli.model, cli.datamodule)  # a clear error before a forward fails on the size
        if plan is None:
            plan = Plan(measure_rate(cli.trainer))
        plan.add(name, arm_work(cli.model, cli.datamodule, cli.trainer, cli.trainer.callbacks, not plan.arms))
    each = ", ".join(f"{name} {minutes(seconds)}" for name, seconds in plan.arms.items())
    print(f"predicted wall time: {minutes(plan.total)} for {len(plan.arms)} arm(s) ({each})", file=sys.stderr)
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
