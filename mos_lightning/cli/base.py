"""The base CLI every subcommand builds on: LightningCLI with the packaged base config, the experiment
keys, precision chosen from the hardware, and a progress display that reads in a log file."""
from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI

from ..callbacks.preemption import Preemption
from ..callbacks.progress import StepProgress
from ..checkpoints import newest_complete
from ..errors import ConfigError
from ..lit import MoSModule
from ..machine import choose_precision, device_type
from ..model.generation import GenerationTower

BASE_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "base.yaml")


class MoSCLI(LightningCLI):
    """LightningCLI with the packaged base config and the experiment keys."""

    def __init__(self, args=None, run: bool = True, progress: StepProgress | None = None, announce: bool = True,
                 **kwargs):
        """`progress`: the arms runner's display (it knows the whole command's plan); `announce`: print the
        precision line (off for the runner's planning builds)."""
        self.progress, self.announce = progress, announce
        defaults = {"default_config_files": [BASE_CONFIG]}
        parser_kwargs = defaults if not run else {c: defaults for c in ("fit", "validate", "test", "predict")}
        super().__init__(MoSModule, None, subclass_mode_data=True, save_config_kwargs={"overwrite": True},
                         parser_kwargs=parser_kwargs, args=args, run=run, seed_everything_default=0, **kwargs)

    def before_instantiate_classes(self) -> None:
        """Checkpoints read as weights only; precision and the frozen tower's dtype from the hardware, unless
        the config names them."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if "weights_only" in config:  # fit/validate/test/predict --ckpt_path: a checkpoint must not run code
            if config.weights_only is False:
                raise ConfigError("weights_only=false: a checkpoint read that way can run any code pickled into "
                                  "it; the kit's checkpoints load with weights_only=true (leave it unset)")
            config.weights_only = True
        parallelism = config.model.get("parallelism")
        self.meta_init = bool(parallelism is not None and parallelism.get("meta_init"))
        if config.get("ckpt_path") == "last":
            config.ckpt_path = resolve_last(config.trainer)
        precision, dtype, why = choose_precision(device_type(config.trainer.get("accelerator")))
        chosen = []
        if config.trainer.get("precision") is None:
            config.trainer.precision = precision
            chosen.append(f"trainer.precision={precision}")
        tower = config.model.get("understanding")
        if tower is not None and tower.get("init_args") is not None and tower.init_args.get("dtype") == "auto":
            tower.init_args.dtype = dtype
            chosen.append(f"understanding dtype={dtype}")
        if self.announce and chosen:
            print(f"precision: {', '.join(chosen)}: {why}; set --trainer.precision or "
                  "--model.understanding.init_args.dtype to override", file=sys.stderr)

    def _add_instantiators(self) -> None:
        super()._add_instantiators()
        self.parser.add_instantiator(self._build_generation, GenerationTower, subclasses=True, prepend=True)

    def _build_generation(self, class_type, *args, **kwargs):
        """model.parallelism.meta_init: the generation tower on the meta device (MoSModule builds the rest of the
        trainable model there; parallel.materialize allocates each rank's shard after sharding)."""
        kwargs.pop("applied_instantiation_links", None)
        with torch.device("meta") if getattr(self, "meta_init", False) else nullcontext():
            return class_type(*args, **kwargs)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        """The step display replaces Lightning's default bar, whose "Epoch 0/-2" means nothing in a
        step-budgeted run and which prints nothing to a log that is not a terminal."""
        given = [*(config.get("callbacks") or []), *callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks = [*callbacks, self.progress or StepProgress()]
        if not any(isinstance(c, Preemption) for c in given):  # always: a preempted run must not exit 0
            callbacks = [*callbacks, Preemption()]
        return super()._instantiate_trainer(config, callbacks)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--experiment.name", type=str, default="default", help="groups the arms' runs")
        parser.add_argument("--experiment.arms", type=Optional[dict[str, dict[str, Any]]], default=None,
                            help="arm name -> {dotted setting: value}; `fit` trains each arm in turn")
        parser.add_argument("--experiment.arm", type=Optional[str], default=None, help="the arm this run is")
        parser.add_argument("--experiment.paper", type=Optional[dict[str, Any]], default=None,
                            help="{best: ARM, metrics: {METRIC: lower|higher}}: the paper's direction, checked "
                                 "by the table of a multi-seed fit")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        use_multiple = getattr(self.datamodule, "use_multiple", None)
        if use_multiple is not None:  # bucket sides follow the model: patch size x autoencoder factor
            use_multiple(self.model.model.generation.patch_size * self.model.model.autoencoder.factor)

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


def resolve_last(trainer_config) -> str | None:
    """`--ckpt_path last`: the newest complete checkpoint in the run's checkpoints/ folder (a save killed half-way
    is skipped and said so); None, so the run starts from step 0, when there is none yet (a first submission)."""
    logger = trainer_config.get("logger")
    args = getattr(logger, "init_args", None) if logger not in (None, False, True) else None
    if args is None or args.get("save_dir") is None:
        raise ConfigError("--ckpt_path last needs trainer.logger with a save_dir (it finds the run's folder); "
                          "pass a checkpoint file instead")
    folder = Path(args.save_dir) / str(args.get("name") or "") / str(args.get("version") or "") / "checkpoints"
    path, skipped = newest_complete(folder)
    for bad in skipped:
        print(f"--ckpt_path last: skipped {bad} (incomplete: a save that did not finish)", file=sys.stderr)
    print(f"--ckpt_path last: {path or f'no complete checkpoint in {folder}; starting from step 0'}",
          file=sys.stderr)
    return None if path is None else str(path)


def check_image_size(model: MoSModule, datamodule) -> None:
    """Every shape a batch can take (each bucket) must tile into whole patches."""
    sizes = getattr(datamodule, "image_sizes", [getattr(datamodule, "image_size", None)])
    unit = model.model.generation.patch_size * model.model.autoencoder.factor
    for size in filter(None, sizes):
        if size[0] % unit or size[1] % unit:
            raise ConfigError(f"data.image_size={tuple(size)} is not divisible by model.generation.patch_size x "
                              f"autoencoder factor = {unit}")


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


def config_error_in(err: BaseException | None) -> ConfigError | None:
    """jsonargparse re-raises a component's error as its own ValueError; find ours in the chain."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
