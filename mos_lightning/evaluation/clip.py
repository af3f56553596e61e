"""CLIP score through open_clip, with a small CLIP for the embedded shapes domain shipped in the package.

CLIP score (Hessel et al., 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning",
arXiv:2104.08718; the scaling used by torchmetrics' CLIPScore) is 100 * max(cos(E_image, E_text), 0).

"shapes-clip" is a tiny ViT/text-transformer CLIP for 32x32 shapes renders, trained by
`python tools/train_shapes_clip.py` (a tool of the checkout, not of the package); its config and weights live
in `assets/`. Any other open_clip model name ("ViT-L-14" with pretrained "openai", or a local weights file) is
deferred to open_clip.
Images enter as the kit's (B, 3, H, W) tensors in [-1, 1]; no PIL round trip.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F

from mos_lightning.errors import ConfigError

SHAPES_CLIP = "shapes-clip"
ASSETS = Path(__file__).resolve().parent / "assets"
SHAPES_CONFIG = ASSETS / "shapes_clip.json"
SHAPES_WEIGHTS = ASSETS / "shapes_clip.pt"
# mean = std = 0.5 maps [0, 1] to [-1, 1]: the kit's images are already the model's normalised input.
SHAPES_PREPROCESS = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz")


@dataclass
class Clip:
    """An open_clip model with its tokenizer and the preprocessing it was trained with."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    image_size: tuple[int, int]  # (H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return prepare_images(images, self.image_size, self.mean, self.std).to(self.device)

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError("captions: expected a sequence of strings")
        return self.tokenizer(list(captions)).to(self.device)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, D) L2-normalised float32 features."""
        return F.normalize(self.model.encode_image(self.prepare(images)).float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, captions: Sequence[str]) -> torch.Tensor:
        """B captions -> (B, D) L2-normalised float32 features."""
        return F.normalize(self.model.encode_text(self.tokenize(captions)).float(), dim=-1)


def prepare_images(images: torch.Tensor, image_size: int | tuple[int, int], mean: Sequence[float],
                   std: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> the model's input: as open_clip's eval transform (bicubic resize of the short
    side, centre crop, normalise), done on tensors. A no-op resize when the size already matches."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected (B, 3, H, W), got {tuple(images.shape)}")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    x = (images.float().clamp(-1, 1) + 1) / 2
    if tuple(x.shape[-2:]) != size:
        x = _resize_crop(x, size)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def _resize_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    h, w = x.shape[-2:]  # the binding side goes to its target, the other keeps the ratio (torchvision's int())
    if size[0] / h >= size[1] / w:
        new = (size[0], max(size[1], int(size[0] * w / h)))
    else:
        new = (max(size[0], int(size[1] * h / w)), size[1])
    x = F.interpolate(x, size=new, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (new[0] - size[0]) // 2, (new[1] - size[1]) // 2
    return x[..., top:top + size[0], left:left + size[1]]


def clip_score(clip: Clip, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
    """Per-pair CLIP score, (B,): 100 * max(cos(image_i, caption_i), 0)."""
    if len(captions) != images.shape[0]:
        raise ValueError(f"captions: {len(captions)} captions for {images.shape[0]} images")
    cos = (clip.encode_images(images) * clip.encode_texts(captions)).sum(-1)
    return 100 * cos.clamp(min=0)


def mean_clip_score(clip: Clip, images: torch.Tensor, captions: Sequence[str], batch_size: int = 64) -> float:
    """Mean CLIP score over all pairs, encoded `batch_size` at a time."""
    if len(captions) != images.shape[0]:
        raise ValueError(f"captions: {len(captions)} captions for {images.shape[0]} images")
    scores = [clip_score(clip, images[i:i + batch_size], captions[i:i + batch_size])
              for i in range(0, len(captions), batch_size)]
    return torch.cat(scores).mean().item() if scores else float("nan")


def _register(config_path: str | os.PathLike) -> Path:
    """Make open_clip know the config under its file stem (how open_clip names configs)."""
    path = Path(config_path).resolve()
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"config_path: expected a readable open_clip model config .json, got "
                          f"{str(config_path)!r} ({err})") from err
    if not isinstance(cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= cfg.keys():
        raise ConfigError(f"config_path: {str(config_path)!r} needs embed_dim, vision_cfg and text_cfg")
    if open_clip.get_model_config(path.stem) != cfg:  # registering appends a search path: only when needed
        open_clip.add_model_config(path)
    return path


def _is_shapes(model_name: str) -> bool:
    return model_name in (SHAPES_CLIP, SHAPES_CONFIG.stem)


def _resolve_name(model_name: str, config_path) -> str:
    """The open_clip registry name for `model_name`, registering configs as needed."""
    if _is_shapes(model_name):
        return _register(config_path or SHAPES_CONFIG).stem
    if config_path is not None:
        path = _register(config_path)
        if path.stem != model_name:
            raise ConfigError(f"model_name: open_clip names the config {path.name} {path.stem!r}, got {model_name!r}")
    if model_name not in open_clip.list_models():
        names = open_clip.list_models()
        examples = [n for n in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14") if n in names]
        raise ConfigError(f"model_name: unknown CLIP model {model_name!r}; use {SHAPES_CLIP!r} or an open_clip "
                          f"name, e.g. {', '.join(examples)} ({len(names)} known, see open_clip.list_models()), "
                          "or pass config_path for a custom config")
    return model_name


def _missing_hint(name: str, pretrained: str, shapes: bool, tags: list[str]) -> str:
    if shapes:
        return (f"omit pretrained for the packaged weights ({SHAPES_WEIGHTS}) or train some with "
                f"`python tools/train_shapes_clip.py --out {pretrained}` in a checkout of the kit")
    hint = f"put an open_clip checkpoint of {name} there"
    if tags:
        hint += f", or pass a tag ({', '.join(tags[:3])}{', ...' if len(tags) > 3 else ''}) to download once online"
    return hint


def _check_pretrained(name: str, pretrained: str, shapes: bool) -> None:
    tags = open_clip.list_pretrained_tags_by_model(name)
    looks_like_path = os.sep in pretrained or pretrained.endswith(_WEIGHT_SUFFIXES)
    if looks_like_path or os.path.exists(pretrained):
        if not os.path.isfile(pretrained):
            raise ConfigError(f"pretrained: weights file {pretrained!r} does not exist; "
                              + _missing_hint(name, pretrained, shapes, tags))
        return
    if pretrained not in tags:
        raise ConfigError(f"pretrained: {pretrained!r} is neither a weights file nor a tag of {name}; "
                          f"tags: {', '.join(tags) or 'none'}")


def create_clip(model_name: str = SHAPES_CLIP, pretrained: str | None = None, config_path: str | None = None,
                device: str | torch.device = "cpu") -> Clip:
    """Build a Clip; `pretrained=None` leaves it randomly initialised (training starts here). Weights are
    checked before anything is built or fetched."""
    name, shapes = _resolve_name(model_name, config_path), _is_shapes(model_name)
    if pretrained is not None:
        _check_pretrained(name, str(pretrained), shapes)
    force = SHAPES_PREPROCESS if shapes else None
    try:
        model = open_clip.create_model(name, pretrained=None if pretrained is None else str(pretrained),
                                       device=device, force_preprocess_cfg=force)
    except RuntimeError as err:  # a checkpoint that does not fit, or a tag whose download failed (offline)
        hint = (f"is it a checkpoint of this config ({name})?" if os.path.isfile(str(pretrained)) else
                "tags download once, with network, into the Hugging Face cache; offline, pass a local weights file")
        raise ConfigError(f"pretrained: could not load {pretrained!r} for {name}: {err}; {hint}") from err
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"]
    return Clip(model_name, model.eval(), open_clip.get_tokenizer(name),
                (size, size) if isinstance(size, int) else tuple(size), tuple(cfg["mean"]), tuple(cfg["std"]))


def load_clip(model_name: str = SHAPES_CLIP, pretrained: str | None = None, config_path: str | None = None,
              device: str | torch.device = "cpu") -> Clip:
    """A pretrained CLIP for scoring. "shapes-clip" defaults to the packaged weights; other models need
    `pretrained` (an open_clip tag such as "openai", or a local file). Loads every call: callers cache it."""
    if pretrained is None:
        if not _is_shapes(model_name):
            _resolve_name(model_name, config_path)  # an unknown name is the first thing to report
            raise ConfigError(f"pretrained: required for {model_name!r} (an open_clip tag or a weights file)")
        pretrained = str(SHAPES_WEIGHTS)
    return create_clip(model_name, pretrained, config_path, device)
