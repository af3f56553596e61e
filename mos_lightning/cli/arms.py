"""The arms runner: an experiment YAML's `experiment.arms` (each a dict of dotted setting -> value), each
trained in turn as its own LightningCLI run with the same seed, data and budget, logging to
<save_dir>/<experiment>/<arm>; then the table of all arms, printed and written. With `--seeds 0,1,2` every
arm runs once per seed, logging to <save_dir>/<experiment>/<arm>/seed<k>, and the table is mean ± std.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml

from ..budget import Plan
from ..callbacks.progress import StepProgress
from ..errors import ConfigError
from ..results import arm_row, log_row, write_table
from .base import MoSCLI


def _config_paths(args: list[str]) -> list[str]:
    paths = []
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            paths.append(args[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def read_experiment(args: list[str]) -> dict:
    """The `experiment` section merged over every --config (later files win)."""
    experiment = {"name": "default", "arms": None}
    for path in _config_paths(args):
        if not Path(path).is_file():
            return experiment  # let the parser report the missing file
        section = (yaml.safe_load(Path(path).read_text()) or {}).get("experiment") or {}
        experiment.update({k: v for k, v in section.items() if v is not None})
    return experiment


def select_arms(experiment: dict, arm: str | None) -> dict[str, dict]:
    """The experiment's arms, or those `arm` names (one, or several comma-separated), in the experiment's order."""
    arms = experiment.get("arms") or {"default": {}}
    if arm is None:
        return arms
    names = [name.strip() for name in arm.split(",")]
    for name in names:
        if name not in arms:
            raise ConfigError(f"--arm {name!r} is not an arm of experiment {experiment['name']!r}; "
                              f"allowed: {', '.join(arms)} (several: --arm a,b)")
    return {name: overrides for name, overrides in arms.items() if name in names}


def run_name(arm: str, seed: int | None) -> str:
    """A run's TensorBoard version (its folder under <save_dir>/<experiment>) and its key in the plan."""
    return arm if seed is None else f"{arm}/seed{seed}"


def run_order(arms: dict[str, dict], seeds: list[int] | None) -> list[tuple[str, int | None]]:
    """(arm, seed) of each run: seed by seed, every arm in turn, so a stopped command already holds whole
    comparisons of its first seeds."""
    return [(name, seed) for seed in (seeds or [None]) for name in arms]


def arm_args(name: str, overrides: dict, experiment: dict, seed: int | None = None) -> list[str]:
    """An arm's settings as command-line overrides, which win over every --config; `seed`: this run's
    seed_everything (None: the config's)."""
    # strings go raw: jsonargparse keeps the quotes of a JSON string given for a `str` setting
    args = [f"--{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in overrides.items()]
    args += [f"--experiment.arm={name}", f"--trainer.logger.init_args.name={experiment['name']}",
             f"--trainer.logger.init_args.version={run_name(name, seed)}"]
    return args + ([] if seed is None else [f"--seed_everything={seed}"])


def with_arm(args: list[str], arm: list[str]) -> list[str]:
    """Arm settings go right after the last --config: they beat the YAMLs, explicit flags beat them."""
    last = max((i + (1 if a == "--config" else 0) for i, a in enumerate(args) if a.startswith("--config")), default=-1)
    return args[: last + 1] + arm + args[last + 1:]


def run_arms(args: list[str], arms: dict[str, dict], experiment: dict, plan: Plan | None = None,
             seeds: list[int] | None = None) -> list[dict]:
    """Train each arm (once per seed); returns the table's rows, one per run (none under --print_config, which
    prints every run's config)."""
    printing = any(a.startswith("--print_config") for a in args)
    rows, cli = [], None
    for name, seed in run_order(arms, seeds):
        run = run_name(name, seed)
        print(f"\n=== {experiment['name']}: arm {name}{'' if seed is None else f', seed {seed}'} ===", file=sys.stderr)
        # model.compile: each arm compiles as if it ran alone (inductor's disk cache keeps repeats cheap), and
        # arms of different strategies do not add up to torch.compile's recompile limit on the block
        torch.compiler.reset()
        try:
            cli = MoSCLI(args=["fit", *with_arm(args, arm_args(name, arms[name], experiment, seed))],
                         progress=StepProgress(plan=plan, arm=run), announce=plan is None)
        except SystemExit as stop:
            if printing and stop.code in (0, None):
                continue
            raise
        rows.append(arm_row(name, cli, plan.arms.get(run) if plan else None))
        log_row(cli, name, rows[-1])
    if rows and cli.trainer.is_global_zero:  # under DDP every rank runs the arms; one writes the table
        write_table(rows, Path(cli.trainer.logger.save_dir) / experiment["name"], experiment.get("paper"))
    return rows
