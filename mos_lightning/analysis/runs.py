"""Runs for the router notebook: load a trained run, or train tiny arms through the CLI in-process."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import yaml

from ..cli import cli_main, read_experiment
from ..cli.sample import load_module, newest_checkpoint

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"  # the source checkout's ablation YAMLs
ROUTER_INPUTS = EXPERIMENTS / "router_inputs.yaml"


def tiny_overlay(steps: int) -> dict:
    """The embedded default shrunk to seconds (as tests/tiny.yaml), training `steps` steps."""
    return {
        "trainer": {"max_steps": steps, "val_check_interval": steps, "log_every_n_steps": 1, "callbacks": [],
                    "enable_model_summary": False, "enable_progress_bar": False},
        "model": {"generation": {"class_path": "mos_lightning.model.generation.GenerationTower",
                                 "init_args": {"width": 32, "depth": 2, "heads": 2}},
                  "sample_steps": 8, "warmup_steps": 5, "compile": False},  # a compile would outlast the run
        "data": {"class_path": "mos_lightning.data.ShapesDataModule",
                 "init_args": {"batch_size": 8, "train_size": 64, "val_size": 8}},
    }


def tiny_run(out_dir: str | Path, experiment: str | Path = ROUTER_INPUTS,
             arms: Sequence[str] = ("prompt", "prompt_latent_timestep"), steps: int = 12) -> dict[str, Path]:
    """Train `arms` of `experiment` with the tiny overlay via `python -m mos_lightning fit` (in-process);
    returns arm -> run folder (<out_dir>/<experiment>/<arm>, with checkpoints/ and config.yaml).

    Each arm is its own `fit --arm` call, so <out_dir>/<experiment>/results.csv holds the last arm only.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    overlay = out_dir / "tiny.yaml"
    overlay.write_text(yaml.safe_dump(tiny_overlay(steps)))
    name = read_experiment(["--config", str(experiment)])["name"]
    for arm in arms:
        cli_main(["fit", "--config", str(experiment), "--config", str(overlay), "--arm", arm,
                  f"--trainer.logger.init_args.save_dir={out_dir}"])
    return {arm: out_dir / name / arm for arm in arms}


def load_run(path: str | Path, trust: Sequence[str] = ()):
    """A MoSModule from a run folder (its newest checkpoint) or from a checkpoint file inside one; `trust`:
    module prefixes beyond the kit's, lightning's and torch's that the run's config may name."""
    path = Path(path)
    if path.suffix == ".ckpt":
        return load_module(path.parent.parent, path, trust)  # <run>/checkpoints/<name>.ckpt
    return load_module(path, newest_checkpoint(path), trust)


def resolve_runs(run: str | None, other: str | None, out_dir: str | Path, steps: int = 12) -> dict[str, Path]:
    """label -> run: the given run(s) (`other` is the second arm to compare), or, when `run` is None,
    two tiny router_inputs arms trained now in `out_dir`."""
    if run is None:
        return tiny_run(out_dir, steps=steps)
    runs = {Path(run).name: Path(run)}
    if other is not None:
        runs[Path(other).name if Path(other).name not in runs else str(other)] = Path(other)
    return runs
