"""The embedded shapes domain: deterministic, in range, and captions that are true to the pixels.

The caption check is independent of the generator: it parses the English, segments the rendered
pixels by exact palette colour, counts connected components and compares centroids.
"""
import re

import numpy as np
import pytest
import torch

from mos_lightning.data import CATEGORIES, ShapesDataModule, ShapesDataset, collate, layout, shapes
from mos_lightning.types import Batch

try:
    from scipy import ndimage
except ImportError:  # pragma: no cover - scipy is optional; a BFS does the same job
    ndimage = None

NUMBERS = {"two": 2, "three": 3, "four": 4}
PLURALS = {"circles": "circle", "squares": "square", "triangles": "triangle", "diamonds": "diamond",
           "crosses": "cross"}
SHAPE = "(circle|square|triangle|diamond|cross)"
COLOUR = "(" + "|".join(shapes.COLOURS) + ")"
RELATION = "(to the left of|to the right of|above|below)"
GRAMMAR = {  # category -> the only caption structure it may use
    "single_object": rf"a {SHAPE}",
    "two_objects": rf"a {SHAPE} and a {SHAPE}",
    "counting": rf"(two|three|four) {COLOUR} (circles|squares|triangles|diamonds|crosses)",
    "colours": rf"a {COLOUR} {SHAPE}",
    "position": rf"a {COLOUR} {SHAPE} {RELATION} a {COLOUR} {SHAPE}",
    "colour_attribution": rf"a {COLOUR} {SHAPE} and a {COLOUR} {SHAPE}",
}


def parse(caption: str, category: str):
    """-> (objects as [(colour or None, shape)], relation phrase or None), from the English alone."""
    m = re.fullmatch(GRAMMAR[category], caption)
    assert m, f"{category} caption {caption!r} does not follow {GRAMMAR[category]!r}"
    g = m.groups()
    if category == "single_object":
        return [(None, g[0])], None
    if category == "two_objects":
        return [(None, g[0]), (None, g[1])], None
    if category == "counting":
        return [(g[1], PLURALS[g[2]])] * NUMBERS[g[0]], None
    if category == "colours":
        return [(g[0], g[1])], None
    if category == "position":
        return [(g[0], g[1]), (g[3], g[4])], g[2]
    return [(g[0], g[1]), (g[2], g[3])], None


def components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, each as an (N, 2) array of (y, x)."""
    if ndimage is not None:
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        return [np.argwhere(labels == k) for k in range(1, n + 1)]
    seen, comps = np.zeros_like(mask), []
    for start in map(tuple, np.argwhere(mask)):
        if seen[start]:
            continue
        stack, comp, seen[start] = [start], [], True
        while stack:
            y, x = stack.pop()
            comp.append((y, x))
            for ny in range(max(y - 1, 0), min(y + 2, mask.shape[0])):
                for nx in range(max(x - 1, 0), min(x + 2, mask.shape[1])):
                    if mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        comps.append(np.array(comp))
    return comps


def segment(image: torch.Tensor) -> dict[str, list[np.ndarray]]:
    """colour name -> its components; asserts every pixel is black or exactly a palette colour."""
    rgb = np.rint((image.permute(1, 2, 0).numpy() + 1) * 127.5).astype(int)
    known = np.all(rgb == 0, axis=-1)
    found = {}
    for name, value in shapes.COLOURS.items():
        mask = np.all(rgb == np.array(value), axis=-1)
        known |= mask
        if mask.any():
            found[name] = components(mask)
    assert known.all(), "pixels outside black + palette (anti-aliasing or a stray colour)"
    return found


def check_true_to_pixels(image: torch.Tensor, caption: str, category: str) -> None:
    objects, relation = parse(caption, category)
    found = segment(image)
    assert sum(len(c) for c in found.values()) == len(objects), (caption, {k: len(v) for k, v in found.items()})
    if objects[0][0] is None:  # colour unstated: only the number of objects is checked
        return
    want = {}
    for colour, _ in objects:
        want[colour] = want.get(colour, 0) + 1
    assert {k: len(v) for k, v in found.items()} == want, caption
    if relation:
        (ya, xa), (yb, xb) = (found[c][0].mean(0) for c, _ in objects)
        along = {"to the left of": xb - xa, "to the right of": xa - xb, "above": yb - ya, "below": ya - yb}
        assert along[relation] >= 1.0, f"{caption!r}: centroids {(xa, ya)} vs {(xb, yb)}"


def test_same_seed_and_index_give_the_same_sample_in_any_order():
    a, b = ShapesDataset(40, seed=7), ShapesDataset(40, seed=7)
    for i in [13, 2, 39, 0]:  # b is read in another order: samples must not depend on history
        img_b, cap_b, cat_b = b[i]
        img_a, cap_a, cat_a = a[i]
        assert torch.equal(img_a, img_b) and cap_a == cap_b and cat_a == cat_b
    assert torch.equal(a[-1][0], a[39][0])


def test_different_seeds_give_different_samples():
    a, b = ShapesDataset(12, seed=0), ShapesDataset(12, seed=1)
    assert sum(not torch.equal(a[i][0], b[i][0]) for i in range(12)) >= 10
    assert [a[i][1] for i in range(12)] != [b[i][1] for i in range(12)]


@pytest.mark.parametrize("size", [32, (32, 48), (48, 32), 16])
def test_images_are_3xHxW_float_in_range(size):
    hw = (size, size) if isinstance(size, int) else size
    ds = ShapesDataset(24, seed=3, image_size=size)
    for i in range(len(ds)):
        image, caption, category = ds[i]
        assert image.shape == (3, *hw) and image.dtype == torch.float32
        assert image.min() == -1.0 and image.max() <= 1.0  # black background, some colour
        assert (image > -1).any()
        check_true_to_pixels(image, caption, category)


def test_every_category_appears_with_its_structure():
    ds = ShapesDataset(60, seed=5)
    seen = {}
    for i in range(len(ds)):
        _, caption, category = ds[i]
        parse(caption, category)
        seen.setdefault(category, caption)
        other = [c for c in CATEGORIES if c != category and re.fullmatch(GRAMMAR[c], caption)]
        assert not other, f"{caption!r} ({category}) also reads as {other}"
    assert set(seen) == set(CATEGORIES)


@pytest.mark.parametrize("size,seed", [(32, 0), (32, 11), ((32, 48), 2), ((48, 32), 9), (16, 4)])
def test_captions_are_true_to_the_pixels(size, seed):
    ds = ShapesDataset(150, seed=seed, image_size=size)
    for i in range(len(ds)):
        scene = ds.scene(i)
        image, caption, category = ds[i]
        assert caption == shapes.caption(scene) and len(scene.objects) == len(parse(caption, category)[0])
        check_true_to_pixels(image, caption, category)


@pytest.mark.parametrize("scale", [0.5, 1.5, 2.0])
def test_scaled_objects_keep_captions_true_and_change_only_sizes(scale, rng):
    seed = int(torch.randint(0, 2**31, (), generator=rng))
    plain, scaled = ShapesDataset(90, seed=seed), ShapesDataset(90, seed=seed, object_scale=scale)
    ratios = []
    for i in range(len(scaled)):
        a, b = plain.scene(i), scaled.scene(i)
        assert shapes.caption(a) == shapes.caption(b)  # what is drawn is the same; where and how big is not
        check_true_to_pixels(*scaled[i])
        n = len(b.objects)
        # the sizes by hand at 32 px: a quarter to 0.44 of it (0.34 for three or four objects), times the scale,
        # at least 4, at most 28 for one object and 14 (a 2x2 cell less the gap) for several
        top = round(32 * (0.44 if n <= 2 else 0.34) * scale)
        lo, hi = max(round(8 * scale), 4), max(min(top, 28 if n == 1 else 14), 4)
        assert all(min(lo, hi) <= o.size <= hi for o in b.objects), (b, lo, hi)
        if n == 1:
            ratios.append(b.objects[0].size / a.objects[0].size)
    assert np.mean(ratios) == pytest.approx(scale, rel=0.25)


def test_the_bucketed_default_draws_scaled_objects_too(rng):
    from mos_lightning.data import BucketedShapesDataset

    seed = int(torch.randint(0, 2**31, (), generator=rng))
    data = BucketedShapesDataset(40, seed=seed, object_scale=2.0)
    for i in range(len(data)):
        canvas = ShapesDataset(40, seed=seed, image_size=data.size_of(i), object_scale=2.0)
        assert torch.equal(data[i][0], canvas[i][0])
    assert data.canvases[(32, 32)].object_scale == 2.0


def test_object_scale_one_is_the_default(rng):
    seed = int(torch.randint(0, 2**31, (), generator=rng))
    assert [ShapesDataset(30, seed=seed, object_scale=1).scene(i) for i in range(30)] == \
        [ShapesDataset(30, seed=seed).scene(i) for i in range(30)]
    sizes = [o.size for i in range(300) for o in shapes.scene_for(seed, i).objects]
    assert min(sizes) == 8 and max(sizes) == 14  # the documented 8-14 px at 32


def test_grid_fallback_keeps_captions_true(monkeypatch):
    monkeypatch.setattr(layout, "_RESTARTS", 0)  # no rejection sampling: every scene takes the fallback
    for size in [32, (16, 40), (40, 16)]:
        ds = ShapesDataset(60, seed=1, image_size=size)
        for i in range(len(ds)):
            check_true_to_pixels(*ds[i])


def test_counting_uses_number_words_and_plurals():
    ds = ShapesDataset(240, seed=8, categories=["counting"])
    counts = set()
    for i in range(len(ds)):
        caption, scene = ds[i][1], ds.scene(i)
        word, _, plural = caption.split()
        assert NUMBERS[word] == len(scene.objects) and PLURALS[plural] == scene.objects[0].shape
        counts.add(NUMBERS[word])
    assert counts == {2, 3, 4}
    assert "crosses" in {ds[i][1].split()[2] for i in range(len(ds))}


def test_position_scenes_satisfy_relation_holds():
    ds = ShapesDataset(120, seed=2, categories=["position"])
    relations = set()
    for i in range(len(ds)):
        scene = ds.scene(i)
        a, b = scene.objects
        assert layout.relation_holds(a.centre, b.centre, scene.relation, margin=(a.size + b.size) / 2)
        relations.add(scene.relation)
    assert relations == set(shapes.RELATIONS)
    assert layout.relation_holds((0, 0), (10, 1), "left of") and not layout.relation_holds((0, 0), (10, 11), "left of")
    assert layout.relation_holds((0, 10), (1, 0), "below") and not layout.relation_holds((0, 0), (0.5, 0), "left of")


def test_render_at_another_size_keeps_the_content():
    scene = ShapesDataset(6, seed=0).scene(4)  # position: two objects
    img = shapes.to_tensor(shapes.render(scene, (64, 96)))
    assert img.shape == (3, 64, 96)
    check_true_to_pixels(img, shapes.caption(scene), scene.category)


def test_datamodule_yields_batches():
    dm = ShapesDataModule(batch_size=8, train_size=20, val_size=10, image_size=(32, 48), seed=3)
    assert dm.image_size == (32, 48)  # the CLI reads this to check the patch size
    train = list(dm.train_dataloader())
    assert len(train) == 2  # drop_last: 20 // 8
    batch = train[0]
    assert isinstance(batch, Batch) and batch.images.shape == (8, 3, 32, 48)
    assert len(batch.captions) == len(batch.categories) == 8
    assert [len(b) for b in dm.val_dataloader()] == [8, 2]
    val = ShapesDataset(10, seed=3 + shapes.VAL_SEED_OFFSET, image_size=(32, 48))
    assert next(iter(dm.val_dataloader())).captions == [val[i][1] for i in range(8)]  # no shuffle
    again = ShapesDataModule(batch_size=8, train_size=20, val_size=10, image_size=(32, 48), seed=3)
    assert next(iter(again.train_dataloader())).captions == batch.captions  # seeded shuffle
    train_caps = {c for b in train for c in b.captions}
    assert train_caps != set(next(iter(dm.val_dataloader())).captions)


def test_workers_give_the_same_batches():
    kw = dict(batch_size=4, train_size=8, val_size=8, seed=1)
    main = [b.images for b in ShapesDataModule(**kw).val_dataloader()]
    forked = [b.images for b in ShapesDataModule(num_workers=2, **kw).val_dataloader()]
    assert all(torch.equal(x, y) for x, y in zip(main, forked)) and len(main) == len(forked) == 2


def test_collate_stacks():
    batch = collate([ShapesDataset(3)[i] for i in range(3)])
    assert batch.images.shape == (3, 3, 32, 32) and batch.categories == list(CATEGORIES[:3])


@pytest.mark.parametrize("make,setting", [
    (lambda: ShapesDataset(0), "length"),
    (lambda: ShapesDataset(4, seed=-1), "seed"),
    (lambda: ShapesDataset(4, image_size=8), "image_size"),
    (lambda: ShapesDataset(4, image_size=(32, 15)), "image_size"),
    (lambda: ShapesDataset(4, image_size=(32,)), "image_size"),
    (lambda: ShapesDataset(4, categories=["counting", "foo"]), "categories: unknown 'foo'; allowed: single_object"),
    (lambda: ShapesDataset(4, categories=[]), "categories"),
    (lambda: ShapesDataModule(batch_size=0), "batch_size"),
    (lambda: ShapesDataModule(batch_size=8, train_size=4), "train_size"),
    (lambda: ShapesDataModule(val_size=-3), "val_size"),
    (lambda: ShapesDataModule(num_workers=-1), "num_workers"),
    (lambda: ShapesDataModule(image_size=12), "image_size"),
    (lambda: ShapesDataModule(categories=("colors",)), "categories"),
    (lambda: ShapesDataModule(object_scale=3), "object_scale: must be a number in [0.5, 2.0]"),
    (lambda: ShapesDataset(4, object_scale="big"), "object_scale"),
])
def test_bad_arguments_name_the_setting(make, setting):
    with pytest.raises(ValueError, match=re.escape(setting)):
        make()
