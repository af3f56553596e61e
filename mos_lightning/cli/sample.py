"""`python -m mos_lightning sample`: a trained run (or checkpoint) + prompts -> PNGs and a grid."""
from __future__ import annotations

import re
from pathlib import Path

import torch
import yaml
from jsonargparse import ArgumentParser
from torchvision.utils import make_grid, save_image

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
    return p


def newest_checkpoint(run: Path) -> Path:
    found = sorted(run.glob("checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ConfigError(f"sample --run {run}: no checkpoints/*.ckpt inside; pass --ckpt_path")
    return found[-1]


def load_module(run: Path, ckpt_path: Path):
    """Rebuild the module from the run's saved config, then load the trained weights."""
    from .base import MoSCLI

    if not (run / "config.yaml").is_file():
        raise ConfigError(f"sample --run {run}: no config.yaml (expected the folder a `fit` run wrote)")
    config = yaml.safe_load((run / "config.yaml").read_text())
    for key in ("ckpt_path", "weights_only"):  # `fit` arguments, not part of the model
        config.pop(key, None)
    config["trainer"].update(logger=False, callbacks=[])
    config["model"]["compile"] = False  # a few prompts' sampling does not repay a compile
    cli = MoSCLI(args=config, run=False)
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)["state_dict"]
    missing, unexpected = cli.model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("model.understanding.")]  # frozen tower is not saved
    if missing or unexpected:
        raise ConfigError(f"sample: checkpoint {ckpt_path} does not match the run's config "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return cli.model


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60]


def sample_main(args: list[str]) -> list[Path]:
    cfg = _parser().parse_args(args)
    run = Path(cfg.run)
    module = load_module(run, Path(cfg.ckpt_path) if cfg.ckpt_path else newest_checkpoint(run))
    images = module.generate(list(cfg.prompts), tuple(cfg.image_size), seed=cfg.seed, steps=cfg.steps,
                             cfg_scale=cfg.cfg_scale)
    images = (images.float().cpu() + 1) / 2
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{i:03d}_{_slug(p)}.png" for i, p in enumerate(cfg.prompts)]
    for image, path in zip(images, paths):
        save_image(image, path)
    save_image(make_grid(images, nrow=min(len(paths), 8), padding=1), out / "grid.png")
    print(f"wrote {len(paths)} samples and grid.png to {out}")
    return paths + [out / "grid.png"]
