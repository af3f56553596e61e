"""The layer between the frozen understanding tower and its users: states already computed are reused.

Two stores, both keyed by caption and by the tower's identity (`tower_identity`):
- the memo: in-process, an LRU of caption -> states. `MEMOS` holds one memo per identity for the whole
  process, so towers of one identity share it and later arms of an ablation reuse the first arm's work;
- the disk cache (App. B.4's producer-consumer, `StateCache`): every caption's m hidden states written once by
  `python -m mos_lightning cache`, read (never written) by training.
`StateStore` puts both in front of a tower's encoder. Neither store runs a model: they take an `encode`
function, so this module imports nothing from `model/`.

Disk layout: <root>/<tower identity>/shard-<id>.safetensors, one bf16 tensor (m, L_i, D_u) per caption, keyed
by the caption's SHA-1. The same machinery holds an autoencoder's posteriors (`LATENTS`), keyed by the SHA-1 of
the exact pixels encoded (so by image, bucket and crop at once), in float32 (a hit is bit for bit what was
written), in a folder named by the autoencoder's identity. The tower's identity hashes its class, config, dtype,
truncation, max_length and its weight files' names, sizes and modification times, so a changed tower reads from
a fresh folder. Shards are
written to a temporary name and renamed into place: a killed pass leaves only `.tmp-*` files, never read.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .types import TowerStates

log = logging.getLogger("mos_lightning.cache")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def caption_key(caption: str) -> str:
    return hashlib.sha1(caption.encode("utf-8")).hexdigest()


def tower_identity(tower) -> str:
    """A short hash of everything that changes the tower's output for a caption.

    `tower` is read through its `path`, `model` (a transformers model) and `max_length` only."""
    path = Path(tower.path)
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir()
                     if p.suffix in WEIGHT_SUFFIXES) if path.is_dir() else [str(path)]
    facts = {"class": type(tower.model).__name__, "config": tower.model.config.to_dict(), "weights": weights,
             "dtype": str(next(tower.model.parameters()).dtype), "max_length": tower.max_length}
    text = json.dumps(facts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def image_key(image: torch.Tensor) -> str:
    """The latent cache's key: the exact pixels (and their shape) an autoencoder is asked to encode."""
    pixels = image.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha1(str(tuple(pixels.shape)).encode() + pixels.numpy().tobytes()).hexdigest()


class StateCache:
    """Read and write one tower's cached states (or one autoencoder's latents); lookups open each shard once,
    lazily. `dtype`: what tensors are stored as (bf16 for tower states; None keeps theirs, as latents do)."""

    def __init__(self, root: str | os.PathLike, identity: str, dtype: torch.dtype | None = torch.bfloat16):
        self.dtype = dtype
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
        fresh = {caption_key(c): t.to(self.dtype or t.dtype).contiguous() for c, t in states.items() if c not in self}
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


def unpad(states: TowerStates) -> list[torch.Tensor]:
    """Per-caption states (m, L_i, D), padding dropped."""
    return [hidden[:, mask] for hidden, mask in zip(states.hidden, states.mask)]


def pad(items: list[torch.Tensor]) -> TowerStates:
    """Right-pad per-caption states (m, L_i, D) into one batch."""
    m, _, d = items[0].shape
    length = max(x.shape[1] for x in items)
    hidden = items[0].new_zeros(len(items), m, length, d)
    mask = torch.zeros(len(items), length, dtype=torch.bool, device=items[0].device)
    for b, x in enumerate(items):
        hidden[b, :, : x.shape[1]] = x
        mask[b, : x.shape[1]] = True
    return TowerStates(hidden=hidden, mask=mask)


@dataclass(frozen=True)
class Layout:
    """What a store holds: how a batch splits into per-key items, how items join back, the stored dtype."""

    split: Callable
    join: Callable
    dtype: torch.dtype | None


TOWER_STATES = Layout(unpad, pad, torch.bfloat16)  # (m, L_i, D_u) per caption, padded back into a batch
LATENTS = Layout(list, torch.stack, None)  # one latent per image, stacked; kept in float32 (bit for bit)


class Memos:
    """The process's caption memos, one per tower identity: the only tower state shared across a process.

    The arms of an ablation run one after another in one process and each builds its tower afresh; a tower of
    an identity seen before gets the same memo back, so it starts with the earlier arms' states. Entries stay
    until a store's LRU bound evicts them or `clear()`.
    """

    def __init__(self):
        self._by_identity: dict[str, OrderedDict[str, torch.Tensor]] = {}

    def of(self, identity: str) -> OrderedDict[str, torch.Tensor]:
        """The memo (caption -> (m, L_i, D_u), oldest first) of one tower identity, created empty on first use."""
        return self._by_identity.setdefault(identity, OrderedDict())

    def clear(self) -> None:
        self._by_identity.clear()


MEMOS = Memos()  # the registry every StateStore uses unless handed another


class StateStore:
    """A tower's memo and disk cache in front of its encoder: hits skip the tower, misses run it.

    All misses of one call are encoded together, in one batch, as the tower would have encoded them. A hit
    returns what the caption's first encoding gave: a caption's states depend slightly (rounding, most of all
    in bf16) on the other captions padded into its batch, so a hit equals its first batch's result, not
    necessarily the caption encoded alone. Disk hits are bf16 as written, then cast to the tower's dtype.

    Args:
        identity: `tower_identity` of the tower whose states these are.
        memo_size: captions kept in memory (LRU); 0 keeps none. Stores of one identity share one memo.
        cache_dir: the root of a disk cache to read from; None reads none.
        memos: the registry the memo comes from (the process-wide `MEMOS` by default).
        layout: how a batch splits into items and joins back (`TOWER_STATES`, or `LATENTS` for an autoencoder).
    """

    def __init__(self, identity: str, memo_size: int = 0, cache_dir: str | os.PathLike | None = None,
                 memos: Memos = MEMOS, layout: "Layout | None" = None):
        self.identity, self.memo_size = identity, memo_size
        self.layout = layout or TOWER_STATES
        self.memo = memos.of(identity) if memo_size > 0 else OrderedDict()
        self.cache = StateCache(cache_dir, identity, self.layout.dtype) if cache_dir is not None else None
        self.cache_hits = self.cache_misses = 0  # disk lookups only: the memo is asked first

    @property
    def active(self) -> bool:
        """False when there is nothing to look up: callers then encode directly."""
        return self.memo_size > 0 or self.cache is not None

    def lookup(self, captions: list[str], encode: Callable[[list[str]], TowerStates], device: torch.device,
               dtype: torch.dtype) -> TowerStates:
        """The states of `captions` (keys), joined by the layout (right-padded tower states); `encode` runs
        once, on the distinct misses."""
        found = {c: self.memo.get(c) for c in dict.fromkeys(captions)}
        found.update({c: self._from_cache(c, device, dtype) for c, s in found.items() if s is None})
        missing = [c for c, s in found.items() if s is None]
        if missing:
            found.update(zip(missing, self.layout.split(encode(missing))))
        self._remember(found)
        return self.layout.join([found[c] for c in captions])

    def _from_cache(self, caption: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        if self.cache is None:
            return None
        states = self.cache.get(caption)
        self.cache_hits += states is not None
        self.cache_misses += states is None
        return None if states is None else states.to(device=device, dtype=dtype)

    def _remember(self, states: dict[str, torch.Tensor]) -> None:
        if self.memo_size <= 0:
            return
        for caption, hidden in states.items():
            self.memo[caption] = hidden
            self.memo.move_to_end(caption)
        while len(self.memo) > self.memo_size:
            self.memo.popitem(last=False)


def dataset_captions(dataset) -> list[str]:
    """Every caption of a map-style dataset; `caption_at(i)` avoids decoding images when offered."""
    caption_at = getattr(dataset, "caption_at", None)
    return [caption_at(i) if caption_at else dataset[i][1] for i in range(len(dataset))]


def fill_latents(encode: Callable[[torch.Tensor], torch.Tensor], batches, cache: StateCache,
                 shard_size: int = 4096) -> tuple[int, int]:
    """Encode every image of `batches` (tensors (B, 3, H, W)) not yet in `cache`, one shard per `shard_size`
    latents. Returns (images seen, latents written)."""
    seen, written, pending = 0, 0, {}
    for images in batches:
        keys = [image_key(image) for image in images]
        seen += len(keys)
        todo = [i for i, k in enumerate(keys) if k not in cache and k not in pending]
        if todo:
            pending.update(zip((keys[i] for i in todo), encode(images[todo])))
        if len(pending) >= shard_size:
            written += len(pending)
            cache.put(pending)
            pending = {}
    if pending:
        written += len(pending)
        cache.put(pending)
    return seen, written


def fill(tower, captions: list[str], cache: StateCache, batch_size: int = 256) -> int:
    """Encode every caption not yet cached, one shard per batch. Returns how many were written."""
    todo = [c for c in dict.fromkeys(captions) if c not in cache]
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        cache.put(dict(zip(chunk, unpad(tower.encode(chunk)))))
    return len(todo)
