"""ShapesEval: GenEval-style exact alignment scoring for the embedded shapes domain.

GenEval (Ghosh et al. 2023, github.com/djghosh13/geneval) turns each prompt into metadata: "include" clauses
(class, count, optional colour, optional position relative to an earlier clause) combined with AND, and
"exclude" clauses (class, count) combined with OR. It detects objects, ranks each class's detections by
confidence, checks colour and position on the top `count` only, and marks an image correct if every clause
holds. The score is the accuracy per task, and `overall` the mean of the task accuracies (summary_scores.py).

Here the metadata comes from the prompt's own `ShapeScene`, and the detector is exact geometry instead of
Mask2Former + CLIP: each pixel is fitted as a scaled palette colour (blur fades colours towards the black
background), connected components per colour are taken, small, elongated, oversized or unshapely ones are
dropped, and each is classified by the domain's own raster of each shape (IoU inside its bounding box).
Detections of one shape are ranked by area, standing in for detector confidence. Pure numpy: no scipy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from mos_lightning.data.layout import relation_holds
from mos_lightning.data.shapes import (
    CATEGORIES,
    COLOURS,
    SHAPES,
    ShapeScene,
    caption,
    check_image_size,
    draw_shape,
    scene_for,
)

PROMPT_SEED = 2_000_003  # neither the train seed (0) nor its val seed (0 + VAL_SEED_OFFSET)
_PALETTE_NAMES = ("background",) + tuple(COLOURS)
_COLOURS = np.array(list(COLOURS.values()), dtype=np.float32)
MIN_ALPHA = 0.4  # a pixel is foreground if at least this bright relative to its palette colour
MAX_RESIDUAL = 90.0  # RGB distance (0-255) from alpha * colour beyond which a pixel is background
MIN_AREA_FRACTION = 0.02  # of the short side squared: 20 px at 32, where the smallest drawn shape has 28
MAX_EXTENT_FRACTION = 0.75  # of the short side: drawn shapes span <= 0.44; a flooded background is no shape
MAX_ASPECT = 2.0  # every drawn shape has a square box
MIN_FIT = 0.6  # IoU with the best template below this: not a shape (noise, merged or torn blobs)


@dataclass(frozen=True)
class Detection:
    shape: str
    colour: str
    centre: tuple[float, float]  # (x, y) bounding-box centre in pixels, as ShapeObject.centre
    area: int  # pixels; ranks same-shape detections as GenEval ranks by detector confidence
    fit: float = 1.0  # IoU with the shape's template


@dataclass(frozen=True)
class Clause:
    """One GenEval metadata clause: `count` objects of `shape` (with `colour` if stated; `relation` to the
    first include clause's objects if stated)."""

    shape: str
    count: int = 1
    colour: str | None = None
    relation: str | None = None


# ---------------------------------------------------------------- prompt set

def prompt_set(per_category: int = 8, image_size=(32, 32), seed: int = PROMPT_SEED) -> list[ShapeScene]:
    """A fixed, held-out prompt set drawn from the domain: `per_category` scenes of each category, in the
    domain's cycling order. Each scene is the prompt's metadata; `caption(scene)` is its prompt."""
    if not isinstance(per_category, int) or per_category < 1:
        raise ValueError(f"per_category: must be an int >= 1, got {per_category!r}")
    hw = check_image_size(image_size)
    return [scene_for(seed, i, hw) for i in range(per_category * len(CATEGORIES))]


PROMPT_SET: tuple[ShapeScene, ...] = tuple(prompt_set())


def captions(scenes: Iterable[ShapeScene]) -> list[str]:
    return [caption(s) for s in scenes]


# ---------------------------------------------------------------- detector

def _to_rgb(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) float32 in [0, 255]."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"detect: expected a (3, H, W) image, got shape {tuple(image.shape)}")
    x = image.detach().to("cpu", torch.float32).clamp(-1, 1)
    return ((x.permute(1, 2, 0).numpy() + 1.0) * 127.5).astype(np.float32)


def colour_map(rgb: np.ndarray) -> np.ndarray:
    """(H, W) palette index per pixel, 0 = background. Blur and fading mix a colour with the black background,
    i.e. scale it, so each pixel is fitted as alpha * colour: it takes the colour with the smallest residual
    among those with alpha >= MIN_ALPHA (near the half-intensity level of a blurred edge, which is where the
    sharp edge was), and is background if none fits within MAX_RESIDUAL."""
    alpha = (rgb @ _COLOURS.T) / (_COLOURS * _COLOURS).sum(1)
    resid = np.linalg.norm(rgb[:, :, None, :] - alpha[..., None] * _COLOURS, axis=-1)
    resid[alpha < MIN_ALPHA] = np.inf
    idx = resid.argmin(-1) + 1
    idx[resid.min(-1) > MAX_RESIDUAL] = 0
    return idx


def label(classes: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-zero class: each pixel gets the smallest flat index in its
    component (min-label propagation, pure numpy); background gets -1."""
    h, w = classes.shape
    fg = classes > 0
    big = h * w
    lab = np.where(fg, np.arange(big).reshape(h, w), big)
    right = fg[:, :-1] & (classes[:, :-1] == classes[:, 1:])
    down = fg[:-1] & (classes[:-1] == classes[1:])
    while True:
        old = lab.copy()
        _relax(lab[:, :-1], lab[:, 1:], right)
        _relax(lab[:-1], lab[1:], down)
        if np.array_equal(old, lab):
            return np.where(fg, lab, -1)


def _relax(a: np.ndarray, b: np.ndarray, linked: np.ndarray) -> None:
    """In place: linked neighbours a, b (overlapping views of one label array) both take the smaller label."""
    m = np.minimum(a, b)
    np.minimum(a, m, out=a, where=linked)
    np.minimum(b, m, out=b, where=linked)


@lru_cache(maxsize=1024)
def templates(h: int, w: int) -> dict[str, np.ndarray]:
    """Every shape drawn by the domain's own rasteriser to fill an h x w box: boolean masks."""
    out = {}
    for shape in SHAPES:
        img = Image.new("L", (w, h), 0)
        draw_shape(ImageDraw.Draw(img), shape, (0, 0, w - 1, h - 1), 255)
        out[shape] = np.asarray(img) > 0
        out[shape].setflags(write=False)  # cached: shared by every caller
    return out


def classify(mask: np.ndarray) -> tuple[str, float]:
    """(shape, IoU) of the template that best fits a component's bounding-box crop."""
    fits = {s: float((t & mask).sum() / (t | mask).sum()) for s, t in templates(*mask.shape).items()}
    best = max(SHAPES, key=fits.__getitem__)
    return best, fits[best]


def _component(labels: np.ndarray, classes: np.ndarray, root: int) -> Detection | None:
    ys, xs = np.nonzero(labels == root)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    h, w = int(y1 - y0 + 1), int(x1 - x0 + 1)
    if max(h, w) > MAX_ASPECT * min(h, w) or max(h, w) > MAX_EXTENT_FRACTION * min(labels.shape):
        return None
    shape, fit = classify(labels[y0:y1 + 1, x0:x1 + 1] == root)
    if fit < MIN_FIT:
        return None
    colour = _PALETTE_NAMES[int(classes[ys[0], xs[0]])]
    return Detection(shape, colour, (float(x0 + x1) / 2, float(y0 + y1) / 2), int(len(ys)), fit)


def detect(image: torch.Tensor, min_area: int | None = None) -> list[Detection]:
    """Shapes in one image (3, H, W) in [-1, 1], largest first. `min_area` (pixels) defaults to
    MIN_AREA_FRACTION of the short side squared."""
    rgb = _to_rgb(image)
    if min_area is None:
        min_area = max(4, round(MIN_AREA_FRACTION * min(rgb.shape[:2]) ** 2))
    classes = colour_map(rgb)
    labels = label(classes)
    roots, areas = np.unique(labels[labels >= 0], return_counts=True)
    found = (_component(labels, classes, int(r)) for r in roots[areas >= min_area])
    return sorted((d for d in found if d is not None), key=lambda d: -d.area)


# ---------------------------------------------------------------- GenEval rules

def clauses(scene: ShapeScene) -> tuple[list[Clause], list[Clause]]:
    """(include, exclude) clauses for a scene, as GenEval's create_prompts.py builds them per task. Where our
    captions state colours that GenEval's prompts leave out (counting, position), the colour joins the clause,
    exactly like GenEval's colour clauses: the image must show what the caption says."""
    objs, cat = scene.objects, scene.category
    first = objs[0]
    if cat == "single_object":
        return [Clause(first.shape)], []
    if cat == "two_objects":
        return [Clause(first.shape), Clause(objs[1].shape)], []
    if cat == "counting":  # exactly N: at least N (all of the stated colour), and not N + 1 of the shape
        n = len(objs)
        return [Clause(first.shape, n, first.colour)], [Clause(first.shape, n + 1)]
    if cat == "colours":
        return [Clause(first.shape, 1, first.colour)], []
    if cat == "position":  # GenEval: target first, then the subject with (relation, target index 0)
        return [Clause(objs[1].shape, 1, objs[1].colour), Clause(first.shape, 1, first.colour, scene.relation)], []
    return [Clause(o.shape, 1, o.colour) for o in objs], []


def _holds(clause: Clause, found: list[Detection], groups: list) -> bool:
    """GenEval's include check on the top-`count` detections of the clause's shape."""
    if len(found) < clause.count:
        return False
    if clause.colour is not None and any(d.colour != clause.colour for d in found):
        return False
    if clause.relation is None:
        return True
    target = groups[0]
    return target is not None and all(relation_holds(a.centre, b.centre, clause.relation)
                                      for a in found for b in target)


def judge(scene: ShapeScene, detections: Sequence[Detection]) -> bool:
    """True if the detections satisfy the scene's prompt under GenEval's rules (see `clauses`): every include
    clause holds on the largest `count` detections of its shape, and no exclude clause's count is reached.
    Summary per category: single_object / two_objects - each named shape present (any colour); counting -
    exactly N of the shape, all in the stated colour; colours - the (largest) shape has the colour;
    colour_attribution - each shape has its colour; position - both coloured shapes found and the subject's
    centre stands in the relation to the target's (`relation_holds`, margin 1 px)."""
    include, exclude = clauses(scene)
    by_shape = {s: sorted((d for d in detections if d.shape == s), key=lambda d: -d.area) for s in SHAPES}
    ok, groups = True, []
    for clause in include:
        found = by_shape[clause.shape][:clause.count]
        matched = _holds(clause, found, groups)
        groups.append(found if matched else None)
        ok = ok and matched
    return ok and all(len(by_shape[c.shape]) < c.count for c in exclude)


def score(scenes: Sequence[ShapeScene], images) -> dict[str, float]:
    """Per-category accuracy and `overall`, the mean of the category accuracies (GenEval's "avg. over tasks").
    `images`: a (B, 3, H, W) tensor in [-1, 1] or a sequence of (3, H, W), one per scene. A category with no
    scene scores NaN and is left out of `overall`."""
    if len(scenes) != len(images):
        raise ValueError(f"score: {len(scenes)} scenes but {len(images)} images")
    results: dict[str, list[bool]] = {c: [] for c in CATEGORIES}
    for scene, image in zip(scenes, images):
        results[scene.category].append(judge(scene, detect(image)))
    acc = {c: (sum(r) / len(r) if r else math.nan) for c, r in results.items()}
    present = [a for a in acc.values() if not math.isnan(a)]
    acc["overall"] = sum(present) / len(present) if present else math.nan
    return acc
