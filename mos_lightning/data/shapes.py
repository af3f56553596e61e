"""The embedded domain: procedurally drawn coloured shapes with exact captions.

No download, no randomness outside numpy's seeded generators: sample i of a dataset with seed s is a pure
function of (s, i), so DataLoader workers and re-runs agree. Captions follow GenEval's six prompt categories
so alignment can be scored per category, and every sample keeps its `ShapeScene` so scoring can be exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

from mos_lightning.data.layout import centre, check_object_scale, place, size_range
from mos_lightning.data.resume import ResumableTrainData
from mos_lightning.errors import ConfigError
from mos_lightning.types import Batch

CATEGORIES = ("single_object", "two_objects", "counting", "colours", "position", "colour_attribution")
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds", "cross": "crosses"}
# Saturated, pairwise far-apart RGB values: pixels are drawn without anti-aliasing, so every non-black pixel
# is exactly one of these and images can be segmented by colour.
COLOURS = {"red": (230, 25, 25), "green": (30, 200, 40), "blue": (40, 90, 255), "yellow": (250, 220, 30),
           "purple": (170, 50, 220), "white": (255, 255, 255)}
RELATIONS = ("left of", "right of", "above", "below")  # objects[0] <relation> objects[1]
RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
MIN_SIDE = 16  # below this, 4 objects with gaps no longer fit recognisably
VAL_SEED_OFFSET = 1_000_003  # val seed = seed + offset, so splits never share a sample


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    centre: tuple[float, float]  # (x, y) in pixels of the scene's image_size
    size: int  # side of the square bounding box, pixels


@dataclass(frozen=True)
class ShapeScene:
    """Everything drawn in one sample; the caption and the pixels both derive from it."""

    category: str
    objects: tuple[ShapeObject, ...]
    image_size: tuple[int, int]  # (H, W)
    relation: str | None = None  # position only: objects[0] <relation> objects[1]


def check_categories(categories: Sequence[str]) -> tuple[str, ...]:
    cats = (categories,) if isinstance(categories, str) else tuple(categories)  # a bare name is one category
    bad = [c for c in cats if c not in CATEGORIES]
    if bad or not cats:
        problem = f"unknown {bad[0]!r}" if bad else "must not be empty"
        raise ConfigError(f"categories: {problem}; allowed: {', '.join(CATEGORIES)}")
    return cats


def check_image_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    """Normalise an int or (H, W) to (H, W); sides below MIN_SIDE cannot hold 4 shapes."""
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(hw) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in hw):
        raise ConfigError(f"image_size: expected an int or (H, W) ints, got {image_size!r}")
    if min(hw) < MIN_SIDE:
        raise ConfigError(f"image_size: each side must be >= {MIN_SIDE}, got {image_size!r}")
    return hw


def _check_int(name: str, value, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name}: must be an int >= {minimum}, got {value!r}")
    return value


def _pick(rng: np.random.Generator, options: Sequence[str], k: int) -> list[str]:
    return [str(v) for v in rng.choice(list(options), size=k, replace=False)]


def _content(rng: np.random.Generator, category: str):
    """(shape, colour) per object and the relation. Two-object categories use different shapes (as GenEval uses
    different classes); where colour is stated they differ too, so colour-to-shape binding is what is tested."""
    shapes, colours = _pick(rng, SHAPES, 2), _pick(rng, COLOURS, 2)
    if category in ("single_object", "colours"):
        return [(shapes[0], colours[0])], None
    if category == "two_objects":  # colour unstated: drawn independently, may repeat
        return [(shapes[0], colours[0]), (shapes[1], _pick(rng, COLOURS, 1)[0])], None
    if category == "counting":
        return [(shapes[0], colours[0])] * int(rng.integers(2, 5)), None
    relation = str(rng.choice(RELATIONS)) if category == "position" else None
    return [(shapes[0], colours[0]), (shapes[1], colours[1])], relation


def make_scene(rng: np.random.Generator, category: str, image_size, object_scale: float = 1.0) -> ShapeScene:
    hw = check_image_size(image_size)
    check_categories([category])
    content, relation = _content(rng, category)
    lo, hi = size_range(min(hw), len(content), check_object_scale(object_scale))
    sizes = [int(rng.integers(lo, hi + 1)) for _ in content]
    tops, sizes = place(rng, sizes, hw, relation)
    objects = tuple(ShapeObject(s, c, centre(t, n), n) for (s, c), t, n in zip(content, tops, sizes))
    return ShapeScene(category, objects, hw, relation)


def scene_for(seed: int, index: int, image_size=32, categories: Sequence[str] = CATEGORIES,
              object_scale: float = 1.0) -> ShapeScene:
    """Sample `index` of the dataset with `seed`: a pure function of its arguments. Categories cycle with the
    index so every split is balanced across them."""
    cats = check_categories(categories)
    rng = np.random.default_rng([seed, index])
    return make_scene(rng, cats[index % len(cats)], image_size, object_scale)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(obj: ShapeObject, with_colour: bool) -> str:
    words = f"{obj.colour} {obj.shape}" if with_colour else obj.shape
    return f"{_article(words)} {words}"


def caption(scene: ShapeScene) -> str:
    """The English description; the category fixes the structure. single_object and two_objects leave colour
    unstated (as GenEval does) so they stay distinct from colours and colour_attribution, which state it."""
    objs, cat = scene.objects, scene.category
    if cat in ("single_object", "colours"):
        return _noun_phrase(objs[0], cat == "colours")
    if cat in ("two_objects", "colour_attribution"):
        coloured = cat == "colour_attribution"
        return f"{_noun_phrase(objs[0], coloured)} and {_noun_phrase(objs[1], coloured)}"
    if cat == "counting":
        return f"{NUMBER_WORDS[len(objs)]} {objs[0].colour} {PLURALS[objs[0].shape]}"
    phrase = RELATION_PHRASES[scene.relation]
    return f"{_noun_phrase(objs[0], True)} {phrase} {_noun_phrase(objs[1], True)}"


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], rgb) -> None:
    """Fill one shape into the inclusive pixel box: the one rasteriser, so ShapesEval's templates match renders."""
    x0, y0, x1, y1 = box
    mx, my = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    elif shape == "triangle":
        draw.polygon([(mx, y0), (x1, y1), (x0, y1)], fill=rgb)
    elif shape == "diamond":
        draw.polygon([(mx, y0), (x1, my), (mx, y1), (x0, my)], fill=rgb)
    else:  # cross: a plus of two bars a third of the box thick (>= 2 px to stay visible)
        w, h = x1 - x0 + 1, y1 - y0 + 1
        tw, th = max(2, w // 3), max(2, h // 3)
        draw.rectangle((x0 + (w - tw) // 2, y0, x0 + (w - tw) // 2 + tw - 1, y1), fill=rgb)
        draw.rectangle((x0, y0 + (h - th) // 2, x1, y0 + (h - th) // 2 + th - 1), fill=rgb)


def render(scene: ShapeScene, size: int | Sequence[int] | None = None) -> Image.Image:
    """Draw the scene on black, without anti-aliasing; `size` (int or (H, W)) defaults to the scene's own size,
    otherwise geometry is scaled to fit."""
    h, w = check_image_size(size) if size is not None else scene.image_size
    sy, sx = h / scene.image_size[0], w / scene.image_size[1]
    img = Image.new("RGB", (w, h), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        left, top = obj.centre[0] - (obj.size - 1) / 2, obj.centre[1] - (obj.size - 1) / 2
        box = (round(left * sx), round(top * sy), round((left + obj.size) * sx) - 1, round((top + obj.size) * sy) - 1)
        draw_shape(draw, obj.shape, box, COLOURS[obj.colour])
    return img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32 in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class ShapesDataset(Dataset):
    """`length` procedurally drawn samples; item i -> (image, caption, category)."""

    def __init__(self, length: int, seed: int = 0, image_size: int | tuple[int, int] = 32,
                 categories: Sequence[str] = CATEGORIES, object_scale: float = 1.0):
        self.length = _check_int("length", length, 1)
        self.seed = _check_int("seed", seed, 0)  # numpy seed sequences reject negatives
        self.image_size = check_image_size(image_size)
        self.categories = check_categories(categories)
        self.object_scale = check_object_scale(object_scale)

    def __len__(self) -> int:
        return self.length

    def scene(self, i: int) -> ShapeScene:
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for ShapesDataset of length {self.length}")
        return scene_for(self.seed, i % self.length, self.image_size, self.categories, self.object_scale)

    def caption_at(self, i: int) -> str:
        """The caption alone, without drawing (the tower cache reads every caption)."""
        return caption(self.scene(i))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, str]:
        scene = self.scene(i)
        return to_tensor(render(scene)), caption(scene), scene.category


def collate(items: Sequence[tuple[torch.Tensor, str, str]]) -> Batch:
    images, captions, categories = zip(*items)
    return Batch(torch.stack(images), list(captions), list(categories))


class ShapesDataModule(ResumableTrainData, L.LightningDataModule):
    """Train split uses `seed`, val uses `seed + VAL_SEED_OFFSET`: disjoint, reproducible. `object_scale`
    draws the objects of both splits larger (> 1) or smaller; ShapesEval's prompt set keeps its own scenes,
    so ShapesEval (which judges shapes, colours, counts and relations, not sizes) compares across scales,
    while FID against the prompt set's renders does not."""

    def __init__(self, batch_size: int = 64, train_size: int = 20000, val_size: int = 256,
                 image_size: int | tuple[int, int] = 32, seed: int = 0, num_workers: int = 0,
                 categories: Sequence[str] = CATEGORIES, object_scale: float = 1.0):
        super().__init__()
        _check_int("batch_size", batch_size, 1)
        _check_int("num_workers", num_workers, 0)
        _check_int("train_size", train_size, 1)
        _check_int("val_size", val_size, 1)
        if train_size < batch_size:  # drop_last=True would silently yield no train batch
            raise ConfigError(f"train_size: must be >= batch_size ({batch_size}), got {train_size}")
        self.save_hyperparameters(logger=False)  # the CLI logs each arm's HParams itself
        self.batch_size, self.seed = batch_size, seed
        # Datasets draw samples on access, so building them here is free and checks seed, image_size and
        # categories before a trainer starts.
        self.train_set = ShapesDataset(train_size, seed, image_size, categories, object_scale)
        self.val_set = ShapesDataset(val_size, seed + VAL_SEED_OFFSET, image_size, categories, object_scale)
        self.image_size = self.train_set.image_size  # (H, W); the CLI checks it against the patch size

    def train_dataloader(self) -> DataLoader:  # one bucket: shuffled full batches, DDP-sharded, resumable
        size = self.train_set.image_size
        return self.bucket_loader(self.train_set, [size] * len(self.train_set), [size], True, collate,
                                  self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=workers, collate_fn=collate,
                          persistent_workers=workers > 0)
