"""What an evaluation generates and what it compares against: the prompts, their categories, the reference
images. One class per setting, chosen by class_path: the embedded shapes domain, or MJHQ-30K (the paper's)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from mos_lightning.data.mjhq import MJHQDataset
from mos_lightning.data.shapes import CATEGORIES, ShapeScene, render, to_tensor
from mos_lightning.errors import ConfigError
from mos_lightning.evaluation.shapes_eval import PROMPT_SEED, captions, prompt_set


@dataclass
class EvalSet:
    captions: list[str]
    categories: list[str]
    reference: object  # images for FID: a (N, 3, H, W) tensor in [-1, 1] or a dataset of (image, ...) items
    data_id: str  # names the reference data in FID cache keys and in saved settings
    scenes: list[ShapeScene] | None = None  # ShapesEval ground truth (shapes domain only)


class EvalPrompts:
    """Base of the prompt sets an Evaluation can use (chosen by class_path)."""

    def build(self, image_size: tuple[int, int]) -> EvalSet:
        raise NotImplementedError

    def __len__(self) -> int:
        """How many prompts `build` gives."""
        raise NotImplementedError


class ShapesPrompts(EvalPrompts):
    """ShapesEval's held-out prompt set (balanced over GenEval's six categories); the FID reference is the
    scenes' own renders, as MJHQ's FID compares each prompt's generation with that prompt's image."""

    def __init__(self, per_category: int = 40, seed: int = PROMPT_SEED):
        if not isinstance(per_category, int) or per_category < 1:
            raise ConfigError(f"per_category: must be an int >= 1, got {per_category!r}")
        self.per_category, self.seed = per_category, seed

    def __len__(self) -> int:
        return self.per_category * len(CATEGORIES)

    def build(self, image_size: tuple[int, int]) -> EvalSet:
        scenes = prompt_set(self.per_category, tuple(image_size), self.seed)
        reference = torch.stack([to_tensor(render(s)) for s in scenes])
        data_id = f"shapes:seed={self.seed}:per_category={self.per_category}:{image_size[0]}x{image_size[1]}"
        return EvalSet(captions(scenes), [s.category for s in scenes], reference, data_id, scenes)


class MJHQPrompts(EvalPrompts):
    """MJHQ-30K (paper Tables 1-3): the first `count` images' prompts of the chosen categories, against those
    images. A missing root is a clear error saying what to fetch."""

    def __init__(self, root: str, count: int = 30000, categories: Sequence[str] | None = None,
                 resolution: int = 256):
        if not isinstance(count, int) or count < 2:
            raise ConfigError(f"count: must be an int >= 2 (FID needs a covariance), got {count!r}")
        self.dataset = MJHQDataset(root, categories, image_size=resolution)
        if len(self.dataset) < count:
            raise ConfigError(f"count: {count} requested but {root!r} holds only {len(self.dataset)} images "
                              f"in categories {', '.join(self.dataset.categories)}")
        self.count = count

    def __len__(self) -> int:
        return self.count

    def build(self, image_size: tuple[int, int]) -> EvalSet:
        ds = self.dataset
        cats = ",".join(ds.categories)
        return EvalSet([ds.caption(i) or "" for i in range(self.count)], [ds.category(i) for i in range(self.count)],
                       ds, f"mjhq:{ds.root}:{cats}:{self.count}")
