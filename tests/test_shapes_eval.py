"""ShapesEval: the detector recovers the ground-truth scene from the domain's own renders (also noisy or blurred),
finds nothing in noise or blank images, the judge rejects wrong colours, counts and relations, and `overall` is
the mean of the category accuracies. Scenes are drawn from fresh random seeds each run (printed)."""
import dataclasses
import math
import os
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from mos_lightning.data.shapes import (
    CATEGORIES,
    COLOURS,
    SHAPES,
    VAL_SEED_OFFSET,
    caption,
    render,
    scene_for,
    to_tensor,
)
from mos_lightning.evaluation import shapes_eval as se

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@pytest.fixture
def seed():
    """A fresh dataset seed per test, printed so a failure can be replayed."""
    value = int.from_bytes(os.urandom(4), "little")
    print(f"scene seed={value}")
    return value


def scenes(seed: int, n: int, size=(32, 32), categories=CATEGORIES):
    return [scene_for(seed, i, size, categories) for i in range(n)]


def image(scene) -> torch.Tensor:
    return to_tensor(render(scene))


def accuracy(scene_list, images) -> float:
    return float(np.mean([se.judge(s, se.detect(x)) for s, x in zip(scene_list, images)]))


def other(options, *used):
    return next(o for o in options if o not in used)


# ---------------------------------------------------------------- prompt set

def test_prompt_set_is_fixed_balanced_and_held_out():
    ps = se.prompt_set(per_category=5)
    assert Counter(s.category for s in ps) == {c: 5 for c in CATEGORIES}
    assert ps == se.prompt_set(per_category=5)  # fixed
    assert se.PROMPT_SET == tuple(se.prompt_set())
    assert se.captions(ps) == [caption(s) for s in ps]
    for train_seed in (0, VAL_SEED_OFFSET):  # not the default train / val samples
        assert not set(ps) & set(scenes(train_seed, len(ps)))
    assert {s.image_size for s in se.prompt_set(2, image_size=(32, 48))} == {(32, 48)}
    with pytest.raises(ValueError, match="per_category"):
        se.prompt_set(per_category=0)


# ---------------------------------------------------------------- detector

def test_label_matches_scipy(rng):
    ndimage = pytest.importorskip("scipy.ndimage")
    classes = torch.randint(0, 3, (40, 56), generator=rng).numpy()
    ours = se.label(classes)
    for c in (1, 2):
        ref, n = ndimage.label(classes == c)  # 4-connectivity by default
        pairs = {(int(a), int(b)) for a, b in zip(ref[classes == c], ours[classes == c])}
        assert len(pairs) == n == len({b for _, b in pairs})  # a bijection between components
    assert (ours[classes == 0] == -1).all()


@pytest.mark.parametrize("size", [(32, 32), (32, 48), (48, 32), (64, 64)])
def test_detector_recovers_the_scene(seed, size):
    """Independent of judge: every object's shape and colour is found, at its centre, and nothing else."""
    wrong = []
    for scene in scenes(seed, 150, size):
        found = se.detect(image(scene))
        got = Counter((d.shape, d.colour) for d in found)
        ok = got == Counter((o.shape, o.colour) for o in scene.objects)
        for o in scene.objects:
            ok &= any(d.shape == o.shape and np.hypot(d.centre[0] - o.centre[0], d.centre[1] - o.centre[1]) <= 1
                      for d in found)
        if not ok:
            wrong.append((scene, found))
    assert len(wrong) <= 1, wrong[:3]  # measured: none


@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
def test_renders_are_judged_correct(seed, size):
    batch = scenes(seed, 240, size)
    result = se.score(batch, torch.stack([image(s) for s in batch]))
    assert result["overall"] >= 0.99, result
    assert min(result[c] for c in CATEGORIES) >= 0.95, result


def test_detect_wants_one_image():
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        se.detect(torch.zeros(1, 3, 32, 32))


# ---------------------------------------------------------------- nothing from nothing

@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
def test_noise_and_blank_images_score_zero(seed, rng, size):
    batch = scenes(seed, 120, size)
    uniform = torch.rand(len(batch), 3, *size, generator=rng) * 2 - 1
    gaussian = torch.randn(len(batch), 3, *size, generator=rng).clamp(-1, 1)
    blank = -torch.ones(len(batch), 3, *size)
    for name, images in (("uniform", uniform), ("gaussian", gaussian), ("blank", blank)):
        result = se.score(batch, images)
        assert result["overall"] <= 0.05, (name, result)
    assert se.detect(blank[0]) == []


def paint(colour, mask: np.ndarray) -> torch.Tensor:
    """`mask` in `colour` (a palette name or an RGB triple) on black."""
    rgb = torch.tensor(COLOURS.get(colour, colour), dtype=torch.float32)[:, None, None] / 127.5 - 1
    return torch.where(torch.from_numpy(mask), rgb, -torch.ones(1, 1, 1))


def test_a_flooded_image_is_no_shape():
    assert se.detect(paint("red", np.ones((32, 32), bool))) == []


def test_faded_colours_count_and_off_palette_colours_do_not():
    square = np.zeros((32, 32), bool)
    square[4:16, 8:20] = True
    faded = tuple(0.6 * v for v in COLOURS["purple"])  # blur and fading scale a colour towards black
    assert [(d.shape, d.colour, d.centre) for d in se.detect(paint(faded, square))] == [("square", "purple",
                                                                                         (13.5, 9.5))]
    assert se.detect(paint((0, 255, 255), square)) == []  # cyan is no palette colour


def test_unshapely_blobs_are_not_shapes():
    frame, ell = np.zeros((32, 32), bool), np.zeros((32, 32), bool)
    frame[2:16, 2:16] = True
    frame[3:15, 3:15] = False  # a hollow square, 1 px thick
    ell[18:30, 18:21] = ell[27:30, 18:30] = True  # an L, 3 px thick
    assert se.detect(paint("red", frame)) == se.detect(paint("green", ell)) == []


# ---------------------------------------------------------------- robustness

def test_robust_to_gaussian_noise(seed, rng):
    batch = scenes(seed, 240)
    noisy = [image(s) + 0.1 * torch.randn(3, 32, 32, generator=rng) for s in batch]
    assert accuracy(batch, noisy) >= 0.95  # measured: 1.0 (0.2: 1.0; 0.3: ~0.96)


def test_robust_to_mild_blur(seed, rng):
    batch = scenes(seed, 240)
    images = torch.stack([image(s) for s in batch])
    blurred = TF.gaussian_blur(images, 3, 0.7) + 0.05 * torch.randn(images.shape, generator=rng)
    assert accuracy(batch, blurred) >= 0.95  # measured: ~0.99


# ---------------------------------------------------------------- the judge's rules

def judged(scene, drawn=None) -> bool:
    """judge `scene` (the prompt) on the image of `drawn` (default: the scene itself)."""
    return se.judge(scene, se.detect(image(drawn or scene)))


def recolour(scene, i):
    objs = list(scene.objects)
    objs[i] = dataclasses.replace(objs[i], colour=other(COLOURS, *(o.colour for o in scene.objects)))
    return dataclasses.replace(scene, objects=tuple(objs))


def reshape(scene, i):
    objs = list(scene.objects)
    objs[i] = dataclasses.replace(objs[i], shape=other(SHAPES, *(o.shape for o in scene.objects)))
    return dataclasses.replace(scene, objects=tuple(objs))


def mirror(scene):
    w = scene.image_size[1]
    return dataclasses.replace(scene, objects=tuple(dataclasses.replace(o, centre=(w - 1 - o.centre[0], o.centre[1]))
                                                    for o in scene.objects))


@pytest.mark.parametrize("category", CATEGORIES)
def test_judge_accepts_the_scene_and_rejects_wrong_variants(seed, category):
    for scene in scenes(seed, 20, categories=[category]):
        assert judged(scene), scene
        last = len(scene.objects) - 1
        assert not judged(scene, reshape(scene, last)), "wrong shape"
        if category not in ("single_object", "two_objects"):  # colour stated
            assert not judged(scene, recolour(scene, 0)) and not judged(scene, recolour(scene, last)), "wrong colour"
        if category == "two_objects":
            assert judged(scene, recolour(scene, 0)), "colour unstated: any colour will do"
        if category == "counting":
            assert not judged(scene, dataclasses.replace(scene, objects=scene.objects[1:])), "too few"
            assert not judged(dataclasses.replace(scene, objects=scene.objects[1:]), scene), "too many"
        if category == "position":
            assert not judged(dataclasses.replace(scene, relation=OPPOSITE[scene.relation]), scene)
            assert not judged(dataclasses.replace(scene, objects=scene.objects[::-1]), scene), "swapped"
            if scene.relation in ("left of", "right of"):  # a mirror image swaps left and right
                assert not judged(scene, mirror(scene))


def test_judge_ranks_detections_by_area_like_geneval_confidence():
    """colours: the largest detection of the shape decides, as GenEval checks only the top-confidence box."""
    scene = scene_for(0, 3, 32, ["colours"])
    obj = scene.objects[0]
    small = se.Detection(obj.shape, obj.colour, (5.0, 5.0), 30)
    big = se.Detection(obj.shape, other(COLOURS, obj.colour), (20.0, 20.0), 90)
    assert se.judge(scene, [small]) and not se.judge(scene, [small, big])


# ---------------------------------------------------------------- the score

def test_overall_is_the_mean_of_category_accuracies(seed, rng):
    pool = scenes(seed, 120)  # 20 per category; keep 20, 19, ..., 15 so micro and macro means differ
    batch = [s for c, cat in enumerate(CATEGORIES) for s in [s for s in pool if s.category == cat][c:]]
    drawn = torch.rand(len(batch), generator=rng) < 0.6  # renders are right, blanks are wrong
    images = torch.stack([image(s) if d else -torch.ones(3, 32, 32) for s, d in zip(batch, drawn)])
    result = se.score(batch, images)
    assert set(result) == set(CATEGORIES) | {"overall"}
    by_hand = {c: float(np.mean([bool(d) for s, d in zip(batch, drawn) if s.category == c])) for c in CATEGORIES}
    for c in CATEGORIES:
        assert result[c] == pytest.approx(by_hand[c])
    assert result["overall"] == pytest.approx(sum(by_hand.values()) / len(CATEGORIES))


def test_score_leaves_absent_categories_out_and_checks_lengths(seed):
    batch = scenes(seed, 4, categories=["counting", "position"])
    result = se.score(batch, [image(s) for s in batch])
    assert result["counting"] == result["position"] == result["overall"] == 1.0
    assert all(math.isnan(result[c]) for c in CATEGORIES if c not in ("counting", "position"))
    with pytest.raises(ValueError, match="2 scenes but 1 images"):
        se.score(batch[:2], [image(batch[0])])
