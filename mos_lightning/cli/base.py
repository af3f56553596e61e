"""The command line: LightningCLI, plus the arms of an ablation and the `sample` subcommand.

`fit --config experiments/X.yaml` reads the YAML's `experiment.arms` (each a dict of dotted
setting -> value) and trains every arm in turn as its own LightningCLI run, same seed, data and
budget, each logging to <save_dir>/<experiment>/<arm>; then prints and writes the table.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from lightning.pytorch.cli import LightningCLI

from .errors import ConfigError
from .lit import MoSModule
from .results import arm_row, log_row, write_table

BASE_CONFIG = str(Path(__file__).parent / "configs" / "base.yaml")


class MoSCLI(LightningCLI):
    """LightningCLI with the packaged base config and the experiment keys."""

    def __init__(self, args=None, run: bool = True, **kwargs):
        defaults = {"default_config_files": [BASE_CONFIG]}
        parser_kwargs = defaults if not run else {c: defaults for c in ("fit", "validate", "test", "predict")}
        super().__init__(MoSModule, None, subclass_mode_data=True, save_config_kwargs={"overwrite": True},
                         parser_kwargs=parser_kwargs, args=args, run=run, seed_everything_default=0, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--experiment.name", type=str, default="default", help="groups the arms' runs")
        parser.add_argument("--experiment.arms", type=Optional[dict[str, dict[str, Any]]], default=None,
                            help="arm name -> {dotted setting: value}; `fit` trains each arm in turn")
        parser.add_argument("--experiment.arm", type=Optional[str], default=None, help="the arm this run is")

    def before_fit(self) -> None:
        check_image_size(self.model, self.datamodule)
        self.fit_start, self.initial_val_loss = time.perf_counter(), None
        if self.config.fit.get("ckpt_path") is None:  # a resumed run already has its starting point logged
            metrics = self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
            self.initial_val_loss = metrics[0].get("val/loss") if metrics else None

    def after_fit(self) -> None:
        self.wall_time = time.perf_counter() - self.fit_start
        summary = getattr(self.datamodule, "skipped_summary", lambda: "")()
        if summary:
            print(f"data: {summary}", file=sys.stderr)  # skipped samples are counted, never silent


def check_image_size(model: MoSModule, datamodule) -> None:
    """Every shape a batch can take (each bucket) must tile into whole patches."""
    sizes = getattr(datamodule, "image_sizes", [getattr(datamodule, "image_size", None)])
    unit = model.model.generation.patch_size * model.model.autoencoder.factor
    for size in filter(None, sizes):
        if size[0] % unit or size[1] % unit:
            raise ConfigError(f"data.image_size={tuple(size)} is not divisible by model.generation.patch_size x "
                              f"autoencoder factor = {unit}")


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


def pop_option(args: list[str], *names: str, default=None) -> tuple[object, list[str]]:
    """Take `--name value` or `--name=value` (any of `names`) out of args; the last one wins."""
    value, rest, i = default, [], 0
    while i < len(args):
        if args[i] in names and i + 1 < len(args):
            value, i = args[i + 1], i + 2
            continue
        if args[i].startswith(tuple(n + "=" for n in names)):
            value = args[i].split("=", 1)[1]
        else:
            rest.append(args[i])
        i += 1
    return value, rest


def select_arms(experiment: dict, arm: str | None) -> dict[str, dict]:
    arms = experiment.get("arms") or {"default": {}}
    if arm is None:
        return arms
    if arm not in arms:
        raise ConfigError(f"--arm {arm!r} is not an arm of experiment {experiment['name']!r}; allowed: {', '.join(arms)}")
    return {arm: arms[arm]}


def arm_args(name: str, overrides: dict, experiment: dict) -> list[str]:
    """An arm's settings as command-line overrides, which win over every --config."""
    # strings go raw: jsonargparse keeps the quotes of a JSON string given for a `str` setting
    args = [f"--{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in overrides.items()]
    return args + [f"--experiment.arm={name}", f"--trainer.logger.init_args.name={experiment['name']}",
                   f"--trainer.logger.init_args.version={name}"]


def with_arm(args: list[str], arm: list[str]) -> list[str]:
    """Arm settings go right after the last --config: they beat the YAMLs, explicit flags beat them."""
    last = max((i + (1 if a == "--config" else 0) for i, a in enumerate(args) if a.startswith("--config")), default=-1)
    return args[: last + 1] + arm + args[last + 1:]


def run_fit(args: list[str]) -> list[dict]:
    arm, args = pop_option(args, "--arm", "--experiment.arm")
    experiment = read_experiment(args)
    arms = select_arms(experiment, arm)
    if len(arms) > 1 and any(a.startswith("--ckpt_path") for a in args):
        raise ConfigError(f"--ckpt_path resumes one arm; add --arm NAME (arms: {', '.join(arms)})")
    printing = any(a.startswith("--print_config") for a in args)
    rows = []
    for name, overrides in arms.items():
        print(f"\n=== {experiment['name']}: arm {name} ===", file=sys.stderr)
        # model.compile: each arm compiles as if it ran alone (inductor's disk cache keeps repeats cheap), and
        # arms of different strategies do not add up to torch.compile's recompile limit on the block
        torch.compiler.reset()
        try:
            cli = MoSCLI(args=["fit", *with_arm(args, arm_args(name, overrides, experiment))])
        except SystemExit as stop:
            if printing and stop.code in (0, None):
                continue  # --print_config: print every arm's config
            raise
        rows.append(arm_row(name, cli))
        log_row(cli, name, rows[-1])
    if rows and cli.trainer.is_global_zero:  # under DDP every rank runs the arms; one writes the table
        write_table(rows, Path(cli.trainer.logger.save_dir) / experiment["name"])
    return rows


def cli_main(args: list[str] | None = None):
    args = list(sys.argv[1:] if args is None else args)
    try:
        if args and args[0] == "sample":
            from .sample import sample_main

            return sample_main(args[1:])
        if args and args[0] == "cache":
            from .cache_cmd import cache_main

            return cache_main(args[1:])
        if args and args[0] == "table":
            from .table_cmd import table_main

            return table_main(args[1:])
        if args and args[0] == "fit":
            return run_fit(args[1:])
        return MoSCLI(args=args)
    except ValueError as err:
        cause = config_error_in(err)
        if cause is None:
            raise
        print(f"mos_lightning: configuration error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None


def config_error_in(err: BaseException | None) -> ConfigError | None:
    """jsonargparse re-raises a component's error as its own ValueError; find ours in the chain."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
