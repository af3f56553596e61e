"""`python -m mos_lightning describe [--config X.yaml ...] [--image_size H W] [--world_size N] [--json]`: what a
config builds, counted on the meta device without a weight (mos_lightning/describe.py): parameters per part, the
FLOPs of one training step per sample, the router / generation FLOP ratio and the bytes each rank holds under FSDP2.
Other flags (`--model.generation.init_args.depth=12`) override the config as in `fit`.
"""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from ..describe import Description, describe
from ..errors import ConfigError
from .base import MoSCLI

PAPER_FIG7 = 0.008 / 0.121  # router / generation seconds per step, MoS-S at 1024^2 on an A100 (§4.1, Fig. 7)


class _ConfigOnly(MoSCLI):
    """The base config, every --config and flag merged and type-checked; nothing instantiated (no weights)."""

    def _set_seed(self) -> None:  # nothing random is drawn, and "Seed set to 0" would only be noise
        pass

    def instantiate_classes(self) -> None:
        pass

    def after_instantiate_classes(self) -> None:
        pass


def config_files(args: list[str]) -> list[str]:
    files = [b for a, b in zip(args, args[1:]) if a == "--config"]
    return files + [a.split("=", 1)[1] for a in args if a.startswith("--config=")]


def read_config(args: list[str]):
    for path in config_files(args):
        if not Path(path).is_file():
            raise ConfigError(f"--config {path}: no such file")
    with warnings.catch_warnings():  # it warns that sys.argv is not what it parses: describe's own flags are in it
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return _ConfigOnly(args=args, run=False, announce=False).config


def default_image_size(config) -> tuple[int, int]:
    """The data's base size: bucket_base (App. A's buckets are ~bucket_base^2), else the data's image_size."""
    data = config.get("data")
    args = data.get("init_args") if data is not None else None
    train = args.get("train") if args is not None else None
    candidates = [] if args is None else [args.get("bucket_base"), args.get("image_size")]
    candidates += [train.init_args.get("image_size")] if train is not None and train.get("init_args") else []
    size = next((c for c in candidates if c), None)
    if size is None:
        raise ConfigError("--image_size: not given, and the config's data has no bucket_base or image_size")
    return (size, size) if isinstance(size, int) else tuple(size)


def default_world_size(config) -> int:
    """The strategy's data_parallel_size, else devices x nodes where they are numbers, else 1."""
    strategy = config.trainer.get("strategy")
    size = strategy.init_args.get("data_parallel_size") if hasattr(strategy, "init_args") else None
    devices, nodes = config.trainer.get("devices"), config.trainer.get("num_nodes") or 1
    return size if isinstance(size, int) else devices * nodes if isinstance(devices, int) else 1


def shards_tower(config) -> bool:
    parallelism = config.model.get("parallelism")
    return parallelism is not None and parallelism.get("understanding") == "shard"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n:,}"


def _flops(n: float) -> str:
    return f"{n / 1e12:.2f} TFLOP" if n >= 1e11 else f"{n / 1e9:.2f} GFLOP"


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def _rows(d: Description) -> list[tuple[str, str, str]]:
    f = d.forward_flops
    return [("understanding tower (frozen, bf16)", _params(d.understanding_params), _flops(d.understanding_flops)),
            ("generation tower", _params(d.generation_params), _flops(f["generation"])),
            ("router", _params(d.router_params), _flops(f["router"])),
            ("Proj_j (FLOPs: + Eq. 4's weighted sum)", _params(d.projection_params), _flops(f["projection"])),
            ("other trainable (null context)", _params(d.other_trainable_params), "-"),
            ("**trainable**", _params(d.trainable_params), _flops(sum(f.values()))),
            ("autoencoder (frozen, fp32)", _params(d.autoencoder_params), "not counted (latents cached)")]


def table(d: Description, configs: list[str]) -> str:
    g, parts = d.geometry, d.bytes_per_rank_parts
    ratio = "n/a (no router)" if d.router_generation_flop_ratio is None else f"{d.router_generation_flop_ratio:.3f}"
    lines = [f"describe {' + '.join(configs) or 'the base config'}: {d.image_size[0]}x{d.image_size[1]} -> latent "
             f"{d.latent_size[0]}x{d.latent_size[1]}, {d.image_tokens} image tokens, {d.context_tokens} context "
             f"tokens; m = {g['m']} tower states of {g['understanding_width']}, n = {g['n']} blocks of "
             f"{g['generation_width']}", "",
             "| part | params | forward FLOPs / sample |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in _rows(d)]
    placement = "sharded" if d.understanding_placement == "shard" else "replicated"
    return "\n".join(lines + [
        "", f"training step per sample (3 x the trainable forward): {_flops(d.flops_per_step)}; the frozen tower's "
            f"forward, once per caption: {_flops(d.understanding_flops)}",
        f"router / generation forward FLOPs: {ratio} (paper Fig. 7, MoS-S at 1024^2: 0.008 s / 0.121 s = "
        f"{PAPER_FIG7:.3f} in time)",
        f"bytes per rank at world size {d.world_size}: {_gib(d.bytes_per_rank)} = trainable fp32 weights, grads and "
        f"AdamW states sharded ({_gib(parts['trainable_states'])}) + tower bf16 {placement} "
        f"({_gib(parts['understanding'])}) + autoencoder fp32 ({_gib(parts['autoencoder'])}); activations not "
        f"counted"])


def parse(args: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m mos_lightning describe", description=__doc__, allow_abbrev=False)
    parser.add_argument("--image_size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="pixels (default: the data's bucket_base, or its image_size)")
    parser.add_argument("--world_size", type=int, default=None,
                        help="FSDP2 ranks (default: the strategy's data_parallel_size, else devices x nodes)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser.parse_known_args(args)


def describe_main(args: list[str]) -> dict:
    opts, rest = parse(args)
    config = read_config(rest)
    size = tuple(opts.image_size) if opts.image_size else default_image_size(config)
    world = opts.world_size if opts.world_size is not None else default_world_size(config)
    description = describe(config.model, size, world, shards_tower(config))
    print(json.dumps(description.as_json()) if opts.json else table(description, config_files(rest)))
    return description.as_json()
