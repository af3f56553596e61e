"""MJHQ-30K: the aesthetic benchmark (10 categories x 3k images) used for FID in the MoS paper.

Read from the official layout, never downloaded here: `root/meta_data.json` maps image id ->
{"category", "prompt"} and images sit at `root/<category>/<id>.jpg`. Items are
(image, prompt, category), so per-category FID needs nothing beyond the shapes `collate`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from mos_lightning.data.images import DEFAULT_MAX_PIXELS
from mos_lightning.data.sources import MapSource
from mos_lightning.errors import ConfigError

FETCH_HINT = ("fetch MJHQ-30K from the Hugging Face dataset playgroundai/MJHQ-30K (mjhq30k_imgs.zip and "
              "meta_data.json) and unzip so that <root>/meta_data.json and <root>/<category>/<id>.jpg exist")


def read_meta(root) -> dict[str, dict]:
    """The id -> {"category", "prompt"} table; a missing root or file is a ConfigError saying what to fetch."""
    path = Path(root)
    meta = path / "meta_data.json"
    if not path.is_dir() or not meta.is_file():
        missing = "root" if not path.is_dir() else "meta_data.json"
        raise ConfigError(f"root: {missing} not found at {str(meta if path.is_dir() else path)!r}; {FETCH_HINT}")
    try:
        table = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"root: {str(meta)!r} is not readable JSON ({err}); {FETCH_HINT}") from err
    if not isinstance(table, dict):
        raise ConfigError(f"root: {str(meta)!r} must map image id -> {{category, prompt}}; {FETCH_HINT}")
    return table


class MJHQDataset(MapSource):
    """MJHQ-30K images with their prompts; `categories` keeps only those (None: all present)."""

    def __init__(self, root, categories: Sequence[str] | None = None, image_size: int | Sequence[int] = 256,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_tries: int = 16):
        super().__init__(image_size, max_pixels, max_tries)
        self.root = Path(root)
        table = read_meta(root)
        rows = [(k, v) for k, v in sorted(table.items()) if isinstance(v, dict) and isinstance(v.get("category"), str)]
        self.present = tuple(sorted({v["category"] for _, v in rows}))
        self.categories = self._check(categories)
        keep = [(k, v) for k, v in rows if v["category"] in self.categories]
        self.ids = [k for k, _ in keep]
        self.paths = [self.root / v["category"] / f"{k}.jpg" for k, v in keep]
        self.prompts = [v.get("prompt") if isinstance(v.get("prompt"), str) else None for _, v in keep]
        self.cats = [v["category"] for _, v in keep]

    def _check(self, categories: Sequence[str] | None) -> tuple[str, ...]:
        if categories is None:
            return self.present
        cats = (categories,) if isinstance(categories, str) else tuple(categories)
        bad = [c for c in cats if c not in self.present]
        if bad or not cats:
            problem = f"unknown {bad[0]!r}" if bad else "must not be empty"
            raise ConfigError(f"categories: {problem}; present in meta_data.json: {', '.join(self.present)}")
        return cats

    def caption(self, i: int) -> str | None:
        return self.prompts[i]

    def category(self, i: int) -> str:
        return self.cats[i]
