"""The understanding-tower cache (App. B.4's producer-consumer): every caption's m hidden states
written once to disk shards, read by training instead of running the frozen tower.

Layout: <root>/<tower identity>/shard-<id>.safetensors, one tensor (m, L_i, D_u) per caption,
keyed by the caption's SHA-1. The identity hashes the tower's class, config, dtype, truncation,
max_length and its weight files' names, sizes and modification times, so a changed tower reads
from a fresh folder. Shards are written to a temporary name and renamed into place: a killed
pass leaves only `.tmp-*` files, which are never read.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .model.understanding import unpad

log = logging.getLogger("mos_lightning.cache")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def caption_key(caption: str) -> str:
    return hashlib.sha1(caption.encode("utf-8")).hexdigest()


def tower_identity(tower) -> str:
    """A short hash of everything that changes the tower's output for a caption."""
    path = Path(tower.path)
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir()
                     if p.suffix in WEIGHT_SUFFIXES) if path.is_dir() else [str(path)]
    facts = {"class": type(tower.model).__name__, "config": tower.model.config.to_dict(), "weights": weights,
             "dtype": str(next(tower.model.parameters()).dtype), "max_length": tower.max_length}
    text = json.dumps(facts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StateCache:
    """Read and write one tower's cached states; lookups open each shard once, lazily."""

    def __init__(self, root: str | os.PathLike, identity: str):
        self.dir = Path(root) / identity
        self.dir.mkdir(parents=True, exist_ok=True)
        self.index: dict[str, Path] = {}
        self.handles: dict[Path, object] = {}
        self.refresh()

    def refresh(self) -> None:
        """Index every complete shard; an unreadable one is skipped with a warning, never fatal."""
        for shard in sorted(self.dir.glob("shard-*.safetensors")):
            if shard in self.handles:
                continue
            try:
                handle = safe_open(str(shard), framework="pt")
            except Exception as err:  # a damaged shard must not stop training
                log.warning("state cache: skipping unreadable shard %s (%s)", shard.name, err)
                continue
            self.handles[shard] = handle
            self.index.update({key: shard for key in handle.keys()})

    def __contains__(self, caption: str) -> bool:
        return caption_key(caption) in self.index

    def __len__(self) -> int:
        return len(self.index)

    def get(self, caption: str) -> torch.Tensor | None:
        shard = self.index.get(caption_key(caption))
        return None if shard is None else self.handles[shard].get_tensor(caption_key(caption))

    def put(self, states: dict[str, torch.Tensor]) -> Path | None:
        """Write one shard of caption -> (m, L_i, D_u) atomically; captions already cached are skipped."""
        fresh = {caption_key(c): t.to(torch.bfloat16).contiguous() for c, t in states.items() if c not in self}
        if not fresh:
            return None
        final = self.dir / f"shard-{uuid.uuid4().hex}.safetensors"
        tmp = self.dir / f".tmp-{final.name}"
        save_file(fresh, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)  # atomic on POSIX: readers see the whole shard or none of it
        self.refresh()
        return final


def dataset_captions(dataset) -> list[str]:
    """Every caption of a map-style dataset; `caption_at(i)` avoids decoding images when offered."""
    caption_at = getattr(dataset, "caption_at", None)
    return [caption_at(i) if caption_at else dataset[i][1] for i in range(len(dataset))]


def fill(tower, captions: list[str], cache: StateCache, batch_size: int = 256) -> int:
    """Encode every caption not yet cached, one shard per batch. Returns how many were written."""
    todo = [c for c in dict.fromkeys(captions) if c not in cache]
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        cache.put(dict(zip(chunk, unpad(tower.encode(chunk)))))
    return len(todo)
