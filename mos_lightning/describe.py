"""What a config builds, without a weight: parameters, FLOPs and memory per rank (`python -m mos_lightning describe`).

The model is built on the meta device: the frozen understanding tower from its Hugging Face config
(`AutoModel.from_config`), the autoencoder from its diffusers config, the generation tower and the fusion from their
YAML arguments. A config is read from the tower's own folder when it is here, else from the architecture shipped in
`mos_lightning/configs/towers/<last part of the path>[/<subfolder>]/config.json`; never from the hub, and no weight
file is opened. FLOPs are torch's FlopCounterMode over one meta forward (shapes only, no arithmetic).
"""
from __future__ import annotations

import importlib
import math
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import ConfigError
from .model.autoencoder import (
    DIFFUSERS_CLASSES,
    SHAPES_AUTOENCODER,
    SHAPES_AUTOENCODER_PATH,
    Autoencoder,
    PixelSpace,
    spatial_factor,
)
from .model.text_to_image import TextToImage
from .model.understanding import UnderstandingTower, _truncate, embedded_model_path
from .types import TowerStates

TOWERS = Path(__file__).resolve().parent / "configs" / "towers"
TRAINABLE_BYTES = 16  # per trainable parameter: fp32 weight + fp32 gradient + AdamW's two fp32 moments
FROZEN_BYTES = 2  # the frozen understanding tower in bf16 (App. A)
AUTOENCODER_BYTES = 4  # fp32 and whole on every rank (App. A; parallel.py leaves it unsharded)
TRAINING = 3  # a training step is 3x the forward: the backward's two matmuls per weight


def architecture_folder(path: str, subfolder: str | None, setting: str) -> Path:
    """A local folder holding the model's config.json: its own folder if present, else the shipped architecture."""
    name = Path(path.rstrip("/")).name
    for folder in (Path(path), TOWERS / name):
        folder = folder / (subfolder or "")
        if (folder / "config.json").is_file():
            return folder
    raise ConfigError(f"{setting}={path!r}: no config.json there, and no architecture shipped at "
                      f"{TOWERS / name / (subfolder or '')}/config.json (describe reads configs, never the hub)")


class MetaTower(UnderstandingTower):
    """The frozen tower's architecture on the meta device: the properties of UnderstandingTower, no tokenizer,
    no weights, no state store (its __init__ loads all three, so it is not called)."""

    def __init__(self, folder: Path, max_length: int, num_layers: int | None = None):
        nn.Module.__init__(self)
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(folder)
        if getattr(config, "num_hidden_layers", None) is None:  # a VLM's composite config
            raise ConfigError(f"understanding: {folder}/config.json has no num_hidden_layers; only the language "
                              "model of a VLM is the understanding tower: point at its text config")
        self.model = AutoModel.from_config(config, dtype=torch.bfloat16).requires_grad_(False).eval()
        if num_layers is not None:
            _truncate(self.model, num_layers)
        self.max_length, self.capture_keys_values = max_length, False


class MetaAutoencoder(Autoencoder):
    """A diffusers autoencoder's architecture on the meta device: its factor, channels and parameters."""

    def __init__(self, folder: Path):
        super().__init__()
        import diffusers

        config = diffusers.AutoencoderKL.load_config(folder)  # reads config.json only
        name = config.get("_class_name")
        if name not in DIFFUSERS_CLASSES:
            raise ConfigError(f"model.autoencoder: {folder} is a {name!r}; allowed: {', '.join(DIFFUSERS_CLASSES)}")
        self.vae = getattr(diffusers, name).from_config(config).requires_grad_(False)
        wan = name == "AutoencoderKLWan"
        self.channels = self.vae.config.z_dim if wan else self.vae.config.latent_channels
        self.factor = spatial_factor(self.vae)


def import_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def arguments(component) -> dict:
    return {} if component.get("init_args") is None else component.init_args.as_dict()


def meta_tower(component) -> MetaTower:
    if component is None or not issubclass(import_class(component.class_path), UnderstandingTower):
        raise ConfigError("model.understanding: describe builds an UnderstandingTower (or a subclass) only")
    args = arguments(component)
    path = args.get("path") or embedded_model_path()
    folder = architecture_folder(path, None, "model.understanding.init_args.path")
    return MetaTower(folder, args.get("max_length", 32), args.get("num_layers"))


def meta_autoencoder(component) -> Autoencoder:
    if component is None or import_class(component.class_path) is PixelSpace:
        return PixelSpace()
    args = arguments(component)
    if "path" not in args:
        raise ConfigError(f"model.autoencoder: describe knows PixelSpace and DiffusersAutoencoder, not "
                          f"{component.class_path}")
    path = str(SHAPES_AUTOENCODER_PATH) if args["path"] == SHAPES_AUTOENCODER else args["path"]
    return MetaAutoencoder(architecture_folder(path, args.get("subfolder"), "model.autoencoder.init_args.path"))


def build(model_config) -> TextToImage:
    """The whole model of a parsed config's `model` section, on the meta device."""
    generation, fusion = model_config.generation, model_config.fusion
    with torch.device("meta"):
        tower = meta_tower(model_config.get("understanding"))
        autoencoder = meta_autoencoder(model_config.get("autoencoder"))
        tower_g = import_class(generation.class_path)(**arguments(generation))
        factory = partial(import_class(fusion.class_path), **arguments(fusion))
        return TextToImage(tower, tower_g, factory, autoencoder, model_config.get("prediction", "velocity"))


def count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def meta_states(model: TextToImage, context: int) -> TowerStates:
    """A full-length prompt's tower output, as shapes: (1, m, L, D_u) states, all tokens real."""
    g, meta = model.geometry, torch.device("meta")
    hidden = torch.empty(1, g.understanding_layers, context, g.understanding_width, dtype=torch.bfloat16, device=meta)
    kv = None
    if model.fusion.reads_keys_values:
        kv_width = g.understanding_kv_heads * g.understanding_head_dim
        kv = torch.empty(1, g.understanding_layers - 1, 2, context, kv_width, dtype=torch.bfloat16, device=meta)
    return TowerStates(hidden=hidden, mask=torch.ones(1, context, dtype=torch.bool, device=meta), keys_values=kv)


def forward_flops(model: TextToImage, latent: tuple[int, int], context: int) -> dict[str, int]:
    """One sample's forward of the trainable path, split into the router, the rest of the fusion (Eq. 4 and
    Proj_j for MoS) and the generation tower (its patchify included: TextToImage calls it directly)."""
    z = torch.empty(1, model.autoencoder.channels, *latent, device="meta")
    t = torch.full((1,), 0.5, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(z, t, meta_states(model, context))
    totals = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    root = type(model).__name__
    fusion, router = totals.get(f"{root}.fusion", 0), totals.get(f"{root}.fusion.router", 0)
    return {"generation": totals.get(root, 0) - fusion, "router": router, "projection": fusion - router}


def tower_flops(tower: UnderstandingTower, context: int) -> int:
    """One prompt's forward through the frozen tower (once per caption; memoised or cached in training)."""
    ids = torch.zeros(1, context, dtype=torch.long, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        tower.model(input_ids=ids, output_hidden_states=True)
    return counter.get_total_flops()


def check_image_size(model: TextToImage, size: tuple[int, int]) -> tuple[int, int]:
    """The latent grid (h, w) of an image size, or a ConfigError naming the settings it must divide by."""
    patch, factor = model.generation.patch_size, model.autoencoder.factor
    unit = patch * factor
    if len(size) != 2 or min(size) < 1 or size[0] % unit or size[1] % unit:
        raise ConfigError(f"--image_size {' '.join(map(str, size))}: each side must be a positive multiple of "
                          f"model.generation.init_args.patch_size x autoencoder factor = {patch} x {factor} = {unit}")
    return size[0] // factor, size[1] // factor


@dataclass
class Description:
    """describe's answer; `as_json` is the --json object (per sample, one training step, one rank)."""

    image_size: tuple[int, int]
    latent_size: tuple[int, int]
    image_tokens: int
    context_tokens: int
    world_size: int
    understanding_placement: str
    understanding_params: int
    generation_params: int
    router_params: int
    projection_params: int
    other_trainable_params: int
    trainable_params: int
    autoencoder_params: int
    understanding_flops: int
    forward_flops: dict[str, int]
    flops_per_step: int
    router_generation_flop_ratio: float | None
    bytes_per_rank_parts: dict[str, int]
    bytes_per_rank: int
    geometry: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict:
        return asdict(self)


def memory(params: dict[str, int], world_size: int, shard: bool) -> dict[str, int]:
    """Bytes held on each rank under FSDP2 (activations and the gathered bf16 blocks left out)."""
    return {"trainable_states": math.ceil(TRAINABLE_BYTES * params["trainable"] / world_size),
            "understanding": math.ceil(FROZEN_BYTES * params["understanding"] / (world_size if shard else 1)),
            "autoencoder": AUTOENCODER_BYTES * params["autoencoder"]}


def parameters(model: TextToImage) -> dict[str, int]:
    router = count(getattr(model.fusion, "router", None))
    trainable = model.trainable_parameters()
    gen, fusion = count(model.generation), count(model.fusion)
    return {"understanding": count(model.understanding), "generation": gen, "router": router,
            "projection": fusion - router, "other": trainable - gen - fusion, "trainable": trainable,
            "autoencoder": count(model.autoencoder)}


def describe(model_config, image_size: tuple[int, int], world_size: int = 1, shard: bool = False) -> Description:
    """Build `model_config` (a parsed config's `model` section) on the meta device and count it at `image_size`."""
    if world_size < 1:
        raise ConfigError(f"--world_size {world_size}: must be >= 1")
    model = build(model_config)
    latent = check_image_size(model, tuple(image_size))
    p, context = parameters(model), model.understanding.max_length
    forward = forward_flops(model, latent, context)
    parts = memory(p, world_size, shard)
    g = model.geometry
    return Description(
        image_size=tuple(image_size), latent_size=latent, context_tokens=context, world_size=world_size,
        image_tokens=latent[0] * latent[1] // model.generation.patch_size ** 2,
        understanding_placement="shard" if shard else "replicate",
        understanding_params=p["understanding"], generation_params=p["generation"], router_params=p["router"],
        projection_params=p["projection"], other_trainable_params=p["other"], trainable_params=p["trainable"],
        autoencoder_params=p["autoencoder"], understanding_flops=tower_flops(model.understanding, context),
        forward_flops=forward, flops_per_step=TRAINING * sum(forward.values()),
        router_generation_flop_ratio=forward["router"] / forward["generation"] if forward["router"] else None,
        bytes_per_rank_parts=parts, bytes_per_rank=sum(parts.values()),
        geometry={"m": g.understanding_layers, "understanding_width": g.understanding_width,
                  "n": g.generation_layers, "generation_width": g.generation_width})
