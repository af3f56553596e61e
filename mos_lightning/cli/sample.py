"""`python -m mos_lightning sample`: a trained run (or checkpoint) + prompts -> PNGs and a grid."""
from __future__ import annotations

import importlib.util
import pickle
import re
import sys
from pathlib import Path
from typing import Iterator, Sequence

import torch
import yaml
from jsonargparse import ArgumentParser
from torchvision.utils import make_grid, save_image

from ..checkpoints import newest_complete
from ..ema import buffer_name
from ..errors import ConfigError


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m mos_lightning sample", description=__doc__)
    p.add_argument("--run", type=str, required=True, help="a run folder: <save_dir>/<experiment>/<arm>")
    p.add_argument("--ckpt_path", type=str, default=None, help="default: the run's newest checkpoint")
    p.add_argument("--prompts", type=list[str], required=True)
    p.add_argument("--out", type=str, default="samples")
    p.add_argument("--image_size", type=tuple[int, int], default=(32, 32))
    p.add_argument("--steps", type=int, default=None, help="default: the run's model.sample_steps")
    p.add_argument("--cfg_scale", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nrow", type=int, default=8, help="images per row of grid.png")
    p.add_argument("--grid_scale", type=int, default=1,
                   help="enlarge grid.png by this factor, nearest neighbour (a 32 px sample is hard to see)")
    p.add_argument("--trust", type=list[str], default=[],
                   help="more module prefixes whose classes the run's config.yaml may name (your own code)")
    return p


def newest_checkpoint(run: Path) -> Path:
    """The run's newest complete checkpoint; a half-written one (a killed save) is never picked."""
    path, skipped = newest_complete(run / "checkpoints")
    for bad in skipped:
        print(f"skipped {bad}: incomplete (a save that did not finish)", file=sys.stderr)
    if path is None:
        raise ConfigError(f"sample --run {run}: no complete checkpoints/*.ckpt inside; pass --ckpt_path")
    return path


# A run folder can come from anyone: rebuilding it instantiates what its config.yaml names, so only these.
TRUSTED = ("mos_lightning.", "lightning.", "torch.")
FIT_ONLY = ("ckpt_path", "weights_only")  # `fit` arguments, not part of the model, data or trainer


def named_classes(node, key: str = "") -> Iterator[tuple[str, str]]:
    """(setting, dotted name) for every class a config would import: each `class_path`, and any other string
    that has a dotted form whose top-level module exists (jsonargparse resolves such strings to classes)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from named_classes(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from named_classes(v, f"{key}[{i}]")
    elif isinstance(node, str) and re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", node):
        if key.endswith("class_path") or importlib.util.find_spec(node.split(".")[0]) is not None:
            yield key, node


def read_run_config(run: Path, trust: Sequence[str] = ()) -> dict:
    """A run's config.yaml, with `fit`-only keys, callbacks and logger left out, checked against TRUSTED."""
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"sample --run {run}: no config.yaml (expected the folder a `fit` run wrote)")
    config = yaml.safe_load((run / "config.yaml").read_text()) or {}
    for key in FIT_ONLY:
        config.pop(key, None)
    config.setdefault("trainer", {}).update(logger=False, callbacks=[])  # what sampling needs of a trainer
    check_trusted(config, run / "config.yaml", trust)
    return config


def check_trusted(config: dict, where: Path, trust: Sequence[str] = ()) -> None:
    allowed = (*TRUSTED, *trust)
    for setting, name in named_classes(config):
        if not name.startswith(allowed):
            raise ConfigError(f"{where}: {setting}={name} is not a class this kit trusts "
                              f"(allowed: {', '.join(allowed)}); if it is your own code, pass --trust {name}")


def read_checkpoint(ckpt_path: Path) -> dict:
    """Tensors and plain containers only (weights_only=True): a checkpoint must never run code when read."""
    if ckpt_path.is_dir():  # reading shards means unpickling (torch.distributed.checkpoint): not for strangers'
        raise ConfigError(f"{ckpt_path} is a sharded checkpoint; make it one file first (only if you trust it): "
                          f"python -m mos_lightning consolidate {ckpt_path}")
    try:
        return torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConfigError(f"checkpoint {ckpt_path} holds more than tensors and plain values, so it is not "
                          f"read (weights_only=True): {str(err).splitlines()[0]}") from None


def load_module(run: Path, ckpt_path: Path, trust: Sequence[str] = ()):
    """Rebuild the module from the run's saved config, then load the trained weights (the EMA's, if the run
    kept one). `trust`: module prefixes beyond TRUSTED that the config may name."""
    from .base import MoSCLI

    config = read_run_config(run, trust)
    config["model"]["compile"] = False  # a few prompts' sampling does not repay a compile
    # one process, unsharded: a run trained with meta_init is rebuilt on the CPU, else the weights would load
    # into meta tensors (a silent no-op)
    config["model"]["parallelism"] = {**(config["model"].get("parallelism") or {}), "meta_init": False}
    cli = MoSCLI(args=config, run=False)
    checkpoint = read_checkpoint(ckpt_path)
    state = checkpoint["state_dict"]
    if "ema" in checkpoint:  # the first EMA format (commit 0b600a6) kept the average beside the state dict
        state.update({f"ema.{buffer_name(n)}": v for n, v in checkpoint["ema"]["shadow"].items()},
                     **{"ema.started": torch.tensor(True)})
    missing, unexpected = cli.model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("model.understanding.")]  # frozen tower is not saved
    if missing or unexpected:
        raise ConfigError(f"sample: checkpoint {ckpt_path} does not match the run's config "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if cli.model.ema is not None:  # sample with the averaged weights (if it has started), as validation does
        cli.model.ema.swap()
    return cli.model


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60]


def sample_main(args: list[str]) -> list[Path]:
    cfg = _parser().parse_args(args)
    for name in ("nrow", "grid_scale"):
        if cfg[name] < 1:
            raise ConfigError(f"sample --{name}: must be an int >= 1, got {cfg[name]}")
    run = Path(cfg.run)
    module = load_module(run, Path(cfg.ckpt_path) if cfg.ckpt_path else newest_checkpoint(run), cfg.trust)
    images = module.generate(list(cfg.prompts), tuple(cfg.image_size), seed=cfg.seed, steps=cfg.steps,
                             cfg_scale=cfg.cfg_scale)
    images = (images.float().cpu() + 1) / 2
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{i:03d}_{_slug(p)}.png" for i, p in enumerate(cfg.prompts)]
    for image, path in zip(images, paths):
        save_image(image, path)
    grid = make_grid(images, nrow=min(len(paths), cfg.nrow), padding=1)
    save_image(grid.repeat_interleave(cfg.grid_scale, 1).repeat_interleave(cfg.grid_scale, 2), out / "grid.png")
    print(f"wrote {len(paths)} samples and grid.png to {out}")
    return paths + [out / "grid.png"]
