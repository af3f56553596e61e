"""FID through torch-fidelity: InceptionV3 (2048-d) or an open_clip image tower, cached reference statistics.

Features come from torch-fidelity's dataset path (`extract_featuresdict_from_input_id`), statistics from
`fid_featuresdict_to_statistics`, the distance from `fid_statistics_to_metric`. Not `calculate_metrics`: it
rebuilds the extractor on every call. Not torch-fidelity's cache: its file name is only (cache name, extractor
name, layer) and it also stores every per-image feature; ours is keyed by all the statistics depend on (data,
weights, layer, resize policy, sample count, categories) and stores mu/sigma with the key, written atomically.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_featuresdict_to_statistics, fid_statistics_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id
from torch_fidelity.version import __version__ as TORCH_FIDELITY_VERSION
from torchvision.transforms.functional import pil_to_tensor

from mos_lightning.errors import ConfigError

INCEPTION = "inception-v3-compat"
OPEN_CLIP_PREFIX = "open-clip:"
ALLOWED = (INCEPTION, OPEN_CLIP_PREFIX + "<open_clip model name>")
_OPEN_CLIP_SPECS: dict[str, dict] = {}  # torch-fidelity name -> {"model", "size", "mean", "std", "normalize"}


class OpenCLIPExtractor(FeatureExtractorBase):
    """An open_clip image tower as torch-fidelity extractor: uint8 (B,3,H,W) -> encode_image features ("clip").
    torch-fidelity calls cls(name, features_list, **kwargs); the model comes from kwarg `open_clip_spec`, else from
    `register_open_clip(name)`. Resizing is torch-fidelity's CLIP one (TF1-compatible bilinear to the tower size)."""

    def __init__(self, name, features_list, open_clip_spec=None, **kwargs):
        super().__init__(name, features_list)
        spec = open_clip_spec or _OPEN_CLIP_SPECS[name]
        self.model, self.size, self.normalize = spec["model"], spec["size"], spec["normalize"]
        self.register_buffer("mean", torch.tensor(spec["mean"], dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(spec["std"], dtype=torch.float32).view(1, 3, 1, 1) * 255)

    get_provided_features_list = staticmethod(lambda: ("clip",))
    get_default_feature_layer_for_metric = staticmethod(lambda metric: "clip")
    can_be_compiled = staticmethod(lambda: False)

    def forward(self, x):
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expecting uint8 images (B,3,H,W), got {x.dtype} {tuple(x.shape)}")
        x = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(self.size, self.size), align_corners=False)
        feats = self.model.encode_image((x - self.mean) / self.std).float()
        return (F.normalize(feats, dim=-1) if self.normalize else feats,)


def register_open_clip(model_name: str, model, image_size: int | None = None, mean=None, std=None,
                       normalize: bool = True) -> str:
    """Make `model` (anything with `encode_image`) torch-fidelity extractor "open-clip:<model_name>" (returned);
    size/mean/std default to the model's open_clip preprocess config."""
    cfg = {}
    if image_size is None or mean is None or std is None:
        import open_clip

        cfg = open_clip.get_model_preprocess_cfg(model)
    size = image_size or np.ravel(cfg["size"])[0]
    name = OPEN_CLIP_PREFIX + model_name
    _OPEN_CLIP_SPECS[name] = {"model": model, "size": int(size), "mean": tuple(mean or cfg["mean"]),
                              "std": tuple(std or cfg["std"]), "normalize": normalize}
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(name, OpenCLIPExtractor)
    return name


class ImagesAsUint8(Dataset):
    """What torch-fidelity reads: uint8 (3,H,W). Sources: a (N,3,H,W) tensor (uint8, or float in [-1,1]),
    a list of image paths, or a Dataset whose items are such an image or a tuple starting with one.
    `resolution` resizes (bicubic, antialiased) to a square before quantising; None keeps the native size."""

    def __init__(self, source, count: int | None = None, resolution: int | None = None):
        self.source, self.resolution = source, resolution
        self.count = len(source) if count is None else count

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        item = self.source[i]
        item = item[0] if isinstance(item, (tuple, list)) else item
        if isinstance(item, (str, os.PathLike)):
            item = pil_to_tensor(Image.open(item).convert("RGB"))
        x = item.float() if item.dtype == torch.uint8 else (item.float() + 1) * 127.5
        if self.resolution is not None and tuple(x.shape[-2:]) != (self.resolution,) * 2:
            x = F.interpolate(x[None], size=(self.resolution,) * 2, mode="bicubic", antialias=True)[0]
        return x.round().clamp(0, 255).to(torch.uint8)


def frechet_distance(stats_1: Mapping, stats_2: Mapping) -> float:
    return float(fid_statistics_to_metric(stats_1, stats_2, verbose=False)[KEY_METRIC_FID])


@dataclass
class FIDResult:
    value: float
    per_category: dict[str, float] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"fid": self.value, "per_category": dict(self.per_category), "settings": dict(self.settings)}

    def save(self, target) -> Path:
        """To `target` if it is a .json path, else to <target>/fid-<extractor>.json (one file per extractor)."""
        name = f"fid-{self.settings.get('extractor', '')}.json".replace(":", "-")
        path = Path(target) if str(target).endswith(".json") else Path(target) / name
        _atomic_write(path, json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str).encode())
        return path


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _digest(parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        if torch.is_tensor(part):
            part = part.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        digest.update(part if isinstance(part, bytes) else str(part).encode())
    return digest.hexdigest()


def data_fingerprint(source, count: int) -> str:
    """Identity of the first `count` items: tensor bytes, or path+size+mtime; otherwise only type and length
    (then the caller's `data_id` must change whenever the data does)."""
    if torch.is_tensor(source):
        return "tensor:" + _digest([tuple(source[:count].shape), source.dtype, source[:count]])
    paths = source if isinstance(source, (list, tuple)) else getattr(source, "paths", None)
    if isinstance(paths, (list, tuple)) and all(isinstance(p, (str, os.PathLike)) for p in paths[:count]):
        lines = (f"{p}|{os.stat(p).st_size}|{os.stat(p).st_mtime_ns}\n" for p in paths[:count])
        return f"files:{getattr(source, 'image_size', None)}:" + _digest(lines)
    return f"dataset:{type(source).__module__}.{type(source).__qualname__}:{len(source)}"


class FrechetDistance:
    """FID against a reference set; the extractor is built once (lazily) and reused by every call.

    extractor: "inception-v3-compat" (layer "2048"; weights_path = local torch-fidelity weights, None downloads
    them) or "open-clip:<name>" (weights_path = open_clip checkpoint for model <name>, or pass `clip_model`).
    num_samples: images used on each side (None: all generated ones). resolution: square resize before uint8.
    """

    def __init__(self, extractor: str = INCEPTION, weights_path=None, *, clip_model=None, num_samples=None,
                 resolution: int | None = None, cache_dir=None, batch_size: int = 32, feature_layer=None):
        self.name, self.weights_path, self.clip_model = extractor, weights_path, clip_model
        self.num_samples, self.resolution, self.batch_size = num_samples, resolution, batch_size
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        is_clip = isinstance(extractor, str) and extractor.startswith(OPEN_CLIP_PREFIX)
        if extractor != INCEPTION and not is_clip:
            raise ConfigError(f"extractor: unknown {extractor!r}; allowed: {', '.join(ALLOWED)}")
        self.feature_layer = feature_layer or ("clip" if is_clip else "2048")
        self.clip_name = extractor[len(OPEN_CLIP_PREFIX):] if is_clip else None
        hint = (f"save the state_dict of open_clip model {self.clip_name!r} there" if is_clip else f"fetch "
                f"{URL_INCEPTION_V3} and put it there (or weights_path=None: torch-fidelity downloads it)")
        if weights_path is not None and not Path(weights_path).is_file():
            raise ConfigError(f"weights_path: {str(weights_path)!r} for extractor {extractor!r} not found; {hint}")
        if is_clip and weights_path is None and clip_model is None:
            raise ConfigError(f"weights_path: extractor {extractor!r} needs an open_clip checkpoint file "
                              f"(or pass clip_model=); {hint}")

    @cached_property
    def weights_identity(self) -> str:
        if self.clip_model is not None:
            return "state_dict:" + _digest(t for _, t in sorted(self.clip_model.state_dict().items()))
        if self.weights_path is not None:
            with open(self.weights_path, "rb") as f:
                return "sha256:" + _digest(iter(lambda: f.read(1 << 22), b""))
        return "url:" + URL_INCEPTION_V3.rsplit("/", 1)[-1]

    @cached_property
    def extractor(self) -> FeatureExtractorBase:
        kwargs = {"cuda": False, "verbose": False}
        if self.name == INCEPTION:
            kwargs["feature_extractor_weights_path"] = None if self.weights_path is None else str(self.weights_path)
        else:
            model = self.clip_model
            if model is None:
                import open_clip

                model = open_clip.create_model(self.clip_name, pretrained=str(self.weights_path))
            register_open_clip(self.clip_name, model)
            kwargs["open_clip_spec"] = _OPEN_CLIP_SPECS[self.name]
        return create_feature_extractor(self.name, [self.feature_layer], **kwargs)

    @property
    def resize_policy(self) -> str:
        pre = "native size" if self.resolution is None else f"bicubic-antialias to {self.resolution}px"
        size = 299 if self.name == INCEPTION else "tower size"
        return f"{pre}, [-1,1]->uint8 round((x+1)*127.5); extractor: tf1-bilinear to {size}"

    def check_reference(self, reference, num_samples: int | None = None) -> int:
        """Raise ConfigError unless the reference holds the requested sample count; call before generating."""
        n = num_samples or self.num_samples or len(reference)
        if len(reference) < n:
            raise ConfigError(f"num_samples: requested {n} but the reference set has only {len(reference)} "
                              f"images; lower num_samples or use a larger reference set")
        return n

    def features(self, images, count: int | None = None) -> torch.Tensor:
        """Features of the first `count` images through torch-fidelity's dataset path (float32, (N, D))."""
        dataset = ImagesAsUint8(images, count, self.resolution)
        feats = extract_featuresdict_from_input_id(1, self.extractor, input1=dataset, batch_size=self.batch_size,
                                                   cuda=False, save_cpu_ram=True, verbose=False)
        return feats[self.feature_layer]

    def _statistics(self, features, categories) -> dict:
        stats = {None: fid_featuresdict_to_statistics({"f": features}, "f")}
        if categories is not None:
            cats = np.asarray(list(categories)[: len(features)], dtype=object)
            for cat in sorted(set(cats)):
                rows = torch.from_numpy(np.flatnonzero(cats == cat))
                if len(rows) < 2:
                    raise ConfigError(f"categories: {cat!r} has {len(rows)} image(s); FID needs at least 2")
                stats[cat] = fid_featuresdict_to_statistics({"f": features[rows]}, "f")
        return stats

    def describe(self) -> dict:
        """The extractor side of every reference-cache key and of every score's settings."""
        return {"extractor": self.name, "weights": self.weights_identity, "feature_layer": self.feature_layer,
                "features": "encode_image, L2-normalised" if self.clip_name else f"layer {self.feature_layer}",
                "resolution": self.resolution, "resize_policy": self.resize_policy,
                "torch_fidelity": TORCH_FIDELITY_VERSION}

    def reference_key(self, reference, data_id: str, count: int, categories=None) -> dict:
        return {"format": 1, "data_id": data_id, "data": data_fingerprint(reference, count), "num_samples": count,
                "categories": None if categories is None else _digest([json.dumps(list(categories)[:count])]),
                **self.describe()}

    def reference_stats(self, reference, data_id: str, categories=None, num_samples: int | None = None) -> dict:
        """{None: overall, category: stats} for the first n reference images; cached on disk when cache_dir is set."""
        n = self.check_reference(reference, num_samples)
        key = self.reference_key(reference, data_id, n, categories)
        name = f"fid-ref-{_digest([json.dumps(key, sort_keys=True)])[:24]}.npz"
        path = None if self.cache_dir is None else self.cache_dir / name
        if path is not None and path.is_file():
            with np.load(path, allow_pickle=False) as z:
                if json.loads(str(z["key"])) == key:
                    return {c: {"mu": z[f"mu{i}"], "sigma": z[f"sigma{i}"]}
                            for i, c in enumerate(json.loads(str(z["categories"])))}
        stats = self._statistics(self.features(reference, n), categories)
        if path is not None:
            self._save_stats(path, key, stats)
        return stats

    def _save_stats(self, path: Path, key: dict, stats: dict) -> None:
        arrays = {f"{k}{i}": s[k] for i, s in enumerate(stats.values()) for k in ("mu", "sigma")}
        buffer = io.BytesIO()
        np.savez(buffer, key=json.dumps(key), categories=json.dumps(list(stats)), **arrays)
        _atomic_write(path, buffer.getvalue())

    def score(self, generated, reference, *, data_id: str, categories=None, reference_categories=None,
              sampler: Mapping | None = None, save_to=None) -> FIDResult:
        """FID of `generated` against `reference` (overall and, with categories, per category)."""
        n = self.check_reference(reference, self.num_samples or len(generated))
        if len(generated) < n:
            raise ConfigError(f"num_samples: requested {n} but only {len(generated)} generated images were given")
        if (categories is None) != (reference_categories is None):
            raise ConfigError("categories: give categories for both generated and reference images, or neither")
        missing = sorted(set(list(categories or [])[:n]) - set(list(reference_categories or [])[:n]), key=str)
        if missing:
            raise ConfigError(f"categories: {missing} not among the first {n} reference images' categories")
        ref = self.reference_stats(reference, data_id, reference_categories, n)
        gen = self._statistics(self.features(generated, n), categories)
        per_category = {c: frechet_distance(gen[c], ref[c]) for c in gen if c is not None}
        result = FIDResult(frechet_distance(gen[None], ref[None]), per_category, self.settings(n, data_id, sampler))
        if save_to is not None:
            result.save(save_to)
        return result

    def settings(self, n: int, data_id: str, sampler: Mapping | None) -> dict:
        """Sampler settings (cfg, steps, seed, precision always present) + extractor side + count + reference."""
        return {**dict.fromkeys(("cfg", "steps", "seed", "precision")), **(sampler or {}), **self.describe(),
                "num_samples": n, "reference": data_id}
