"""Where the shapes go: object sizes on the canvas, and their placement, disjoint and realising the scene's
relation (rejection sampling, then a deterministic grid)."""
from __future__ import annotations

import numpy as np

from mos_lightning.errors import ConfigError

_TRIES, _RESTARTS = 16, 8  # rejection-sampling budget before the grid fallback
OBJECT_SCALES = (0.5, 2.0)  # the range object_scale allows
MIN_OBJECT = 4  # px: a smaller triangle, cross or diamond is no longer its shape
_GAP = 2  # black pixels between boxes: keeps same-colour objects separate components


def check_object_scale(object_scale) -> float:
    if isinstance(object_scale, bool) or not isinstance(object_scale, (int, float)) \
            or not OBJECT_SCALES[0] <= object_scale <= OBJECT_SCALES[1]:
        raise ConfigError(f"object_scale: must be a number in [{OBJECT_SCALES[0]}, {OBJECT_SCALES[1]}] "
                          f"(1 = objects of 8-14 px on a 32 px canvas), got {object_scale!r}")
    return float(object_scale)


def size_range(side: int, count: int, object_scale: float) -> tuple[int, int]:
    """Smallest and largest object side in pixels: a quarter to 0.44 of the canvas's short side (8-14 px at 32;
    3+ objects up to 0.34 to fit), times object_scale. Beyond 1 the top is capped at what still fits: 90 % of
    the canvas for one object, a 2x2 grid cell for several; below, no side under MIN_OBJECT. At 1 neither
    bound binds (shapes.MIN_SIDE keeps sides >= 16), so the default scenes are unchanged."""
    top = 0.44 if count <= 2 else 0.34
    cap = int(side * 0.9) if count == 1 else side // 2 - _GAP
    hi = max(min(round(side * top * object_scale), max(cap, round(side * top))), MIN_OBJECT)
    return max(min(round(side * 0.25 * object_scale), hi), MIN_OBJECT), hi


def relation_holds(a: tuple[float, float], b: tuple[float, float], relation: str, margin: float = 1.0) -> bool:
    """True if centre `a` (x, y) is <relation> centre `b`: offset along the relation's axis of at least `margin`,
    and that axis dominates, so e.g. a diagonal pair is not called 'above'."""
    dx, dy = b[0] - a[0], b[1] - a[1]  # image y grows downwards
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along >= margin and abs(along) > abs(across)


def _disjoint(tops: list[tuple[int, int]], sizes: list[int]) -> bool:
    """No two boxes overlap or come within _GAP pixels of each other."""
    b = [(y, x, s) for (y, x), s in zip(tops, sizes)]
    return all(xa + sa + _GAP <= xb or xb + sb + _GAP <= xa or ya + sa + _GAP <= yb or yb + sb + _GAP <= ya
               for i, (ya, xa, sa) in enumerate(b) for (yb, xb, sb) in b[:i])


def centre(top: tuple[int, int], size: int) -> tuple[float, float]:
    return (top[1] + (size - 1) / 2, top[0] + (size - 1) / 2)


def _fits(tops: list[tuple[int, int]], sizes: list[int], relation: str | None) -> bool:
    """Boxes so far are disjoint and, once both exist, realise the relation with a margin of half the two
    sizes, i.e. the boxes are disjoint along the relation's axis."""
    ok = _disjoint(tops, sizes)
    if ok and relation is not None and len(tops) >= 2:
        a, b = centre(tops[0], sizes[0]), centre(tops[1], sizes[1])
        ok = relation_holds(a, b, relation, margin=(sizes[0] + sizes[1]) / 2)
    return ok


def _grid_fallback(sizes: list[int], hw: tuple[int, int], relation: str | None):
    """Deterministic 2x2 layout for when rejection sampling runs out of tries: always fits, and the cell order
    realises the relation (object 0 is the relation's subject)."""
    ch, cw = hw[0] // 2, hw[1] // 2
    cells = {None: [(0, 0), (0, 1), (1, 0), (1, 1)], "left of": [(0, 0), (0, 1)],
             "right of": [(0, 1), (0, 0)], "above": [(0, 0), (1, 0)], "below": [(1, 0), (0, 0)]}
    sizes = [min(s, min(ch, cw) - _GAP) for s in sizes]
    tops = [(r * ch + (ch - s) // 2, c * cw + (cw - s) // 2) for (r, c), s in zip(cells[relation], sizes)]
    return tops, sizes


def place(rng: np.random.Generator, sizes: list[int], hw: tuple[int, int], relation: str | None):
    """Rejection-sample top-left corners one object at a time (far likelier to fit four objects than all at
    once), restarting when an early object blocks the rest; bounded, then the deterministic grid fallback."""
    for _ in range(_RESTARTS):
        tops: list[tuple[int, int]] = []
        for s in sizes:
            tries = ((int(rng.integers(0, hw[0] - s + 1)), int(rng.integers(0, hw[1] - s + 1))) for _ in range(_TRIES))
            top = next((t for t in tries if _fits(tops + [t], sizes, relation)), None)
            if top is None:
                break  # this layout is stuck: restart it
            tops.append(top)
        else:
            return tops, sizes
    return _grid_fallback(sizes, hw, relation)
