"""Bucket-wise dynamic resolution: batches of one shape, drawn from images of many aspect ratios.

Each sample goes online to the bucket whose aspect ratio is nearest its own; a bucket is dispatched as a batch
once it is full. Every bucket has about the same area (so about the same token count and memory per batch)
and sides that are multiples of patch size x autoencoder factor (so it patchifies without padding).

Under DDP all ranks walk the same permutation and fill the same queues; a dispatch holds batch_size x
num_replicas indices and each rank takes its slice, so all ranks step in lock-step on one bucket shape.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import Sampler

from mos_lightning.errors import ConfigError
from mos_lightning.seeds import mix_seed

AREA_TOLERANCE = 0.10  # a bucket's area may differ from base^2 by this fraction
_RATIO_EPS = 1e-9  # float slack for the max_ratio bound and for ties in log-ratio distance


def _check_int(name: str, value, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name}: must be an int >= {minimum}, got {value!r}")
    return value


def _closest_side(base: int, side: int, multiple: int) -> int:
    """The multiple of `multiple` that makes side x result closest to base^2 in area (never below multiple)."""
    exact = base * base / side
    lo = max(multiple, int(exact // multiple) * multiple)
    return min((lo, lo + multiple), key=lambda w: (abs(side * w - base * base), w))


def bucket_table(base: int, multiple: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(H, W) buckets of area ~base^2, sides divisible by `multiple`, W/H within [1/max_ratio, max_ratio].

    Short sides walk the multiples up to `base`; each gets the long side that brings the area closest to base^2,
    and both orientations are added, so the table is symmetric. Buckets whose area misses base^2 by more than
    AREA_TOLERANCE are dropped; if that drops all (base not a multiple and small), the closest-area pair is kept
    so the table is never empty. Sorted by log(W/H): tall first, then square, then wide.
    """
    _check_int("multiple", multiple, 1)
    if not isinstance(base, int) or isinstance(base, bool) or base < multiple:
        raise ConfigError(f"base: must be an int >= multiple ({multiple}), got {base!r}")
    if not isinstance(max_ratio, (int, float)) or isinstance(max_ratio, bool) or not max_ratio >= 1.0:
        raise ConfigError(f"max_ratio: must be a number >= 1 (long side / short side), got {max_ratio!r}")
    pairs = []  # (short, long)
    for short in range(multiple, base + 1, multiple):
        long = _closest_side(base, short, multiple)
        if short <= long <= short * max_ratio * (1 + _RATIO_EPS):
            pairs.append((short, long))
    if not pairs:  # max_ratio ~1 with base off the multiple grid: no exact square exists; keep the smallest
        pairs = [(multiple, multiple)]
    good = [p for p in pairs if abs(p[0] * p[1] - base * base) <= AREA_TOLERANCE * base * base]
    if not good:
        good = [min(pairs, key=lambda p: (abs(p[0] * p[1] - base * base), p[1] - p[0]))]
    table = {(short, long) for short, long in good} | {(long, short) for short, long in good}
    return sorted(table, key=lambda hw: math.log(hw[1] / hw[0]))


def _log_ratio_key(height: int, width: int, bucket: tuple[int, int]) -> tuple[float, int, int]:
    """Sort key: nearest log aspect ratio; ties (to float slack) go to the larger area, then the smaller H."""
    dist = abs(math.log(height / width) - math.log(bucket[0] / bucket[1]))
    return (round(dist / _RATIO_EPS) * _RATIO_EPS, -bucket[0] * bucket[1], bucket[0])


def nearest_bucket(height: int, width: int, table: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log space, so 2:1 and 1:2 are equally far from 1:1)."""
    if height <= 0 or width <= 0:
        raise ConfigError(f"sizes: each (H, W) must be positive, got {(height, width)!r}")
    if not table:
        raise ConfigError("table: must hold at least one (H, W) bucket")
    return tuple(min(table, key=lambda b: _log_ratio_key(height, width, b)))


def resize_center_crop(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Scale (keeping aspect) until the image covers the bucket, then crop the centre to exactly (H, W).

    Covering then cropping loses a thin border instead of padding or distorting; the bucket was chosen for
    the nearest aspect ratio, so the crop is small.
    """
    height, width = bucket
    w0, h0 = image.size  # PIL sizes are (W, H)
    scale = max(height / h0, width / w0)
    new_w, new_h = max(width, round(w0 * scale)), max(height, round(h0 * scale))
    resized = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return resized.crop((left, top, left + width, top + height))


def _dist_defaults(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """World size and rank from torch.distributed when it is initialised, else a single process."""
    live = torch.distributed.is_available() and torch.distributed.is_initialized()
    if num_replicas is None:
        num_replicas = torch.distributed.get_world_size() if live else 1
    if rank is None:
        rank = torch.distributed.get_rank() if live else 0
    _check_int("num_replicas", num_replicas, 1)
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < num_replicas:
        raise ConfigError(f"rank: must be an int in [0, {num_replicas}), got {rank!r}")
    return num_replicas, rank


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices whose samples share one nearest bucket; use it as a DataLoader's `batch_sampler`.

    Each epoch walks a permutation seeded by (seed, epoch) (identity order when shuffle=False), appending each
    index to its bucket's queue; a queue holding batch_size x num_replicas indices is dispatched and rank r
    takes [r*batch_size:(r+1)*batch_size]. Partial queues left at the epoch end are dropped, so every batch is
    full and all ranks yield the same number of batches with the same bucket at each step. For evaluation,
    drop_last=False (one replica) dispatches the partial queues too, so every sample is seen once.

    Resume: `state_dict()` counts the batches this sampler has handed out this epoch; after `load_state_dict`
    the next `__iter__` of that epoch skips them. With DataLoader workers the loader draws batches ahead of
    training (prefetch), so prefer setting "batches_done" to the trainer's own batch count for that epoch.
    `__len__` always reports the full epoch, including skipped batches, because Lightning sizes the epoch
    progress by it. Under Lightning, pass `use_distributed_sampler=False`: this sampler already shards.
    """

    def __init__(self, sizes: Sequence[tuple[int, int]], batch_size: int, table: Sequence[tuple[int, int]],
                 seed: int = 0, shuffle: bool = True, num_replicas: int | None = None, rank: int | None = None,
                 drop_last: bool = True):
        self.batch_size = _check_int("batch_size", batch_size, 1)
        if len(sizes) == 0:
            raise ConfigError("sizes: must hold at least one (H, W) sample size")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError(f"seed: must be an int, got {seed!r}")
        self.num_replicas, self.rank = _dist_defaults(num_replicas, rank)
        if not drop_last and self.num_replicas > 1:
            raise ConfigError("drop_last: False needs one replica (partial batches would break DDP lock-step); "
                              "evaluate the full set on every rank with num_replicas=1, rank=0")
        self.drop_last = drop_last
        self.table = [tuple(b) for b in table]
        slot = {b: i for i, b in enumerate(self.table)}
        self._bucket = [slot[nearest_bucket(h, w, self.table)] for h, w in sizes]  # sample -> table row
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self._batches_done = 0, 0
        self._skip: tuple[int, int] | None = None  # (epoch, batches) pending from load_state_dict
        self._plan_cache: tuple[int, list[list[int]]] | None = None  # (epoch, global dispatches)

    def bucket_of(self, index: int) -> tuple[int, int]:
        """The (H, W) bucket sample `index` is resized into."""
        return self.table[self._bucket[index]]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation (like DistributedSampler); a pending resume skip is kept for its epoch."""
        if epoch != self.epoch:
            self._batches_done = 0
        if self._skip is not None and self._skip[0] != epoch:
            self._skip = None  # moving to another epoch abandons the resume point
        self.epoch = epoch

    def _order(self, epoch: int) -> list[int]:
        n = len(self._bucket)
        if not self.shuffle:
            return list(range(n))
        return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch))).tolist()

    def _plan(self, epoch: int) -> list[list[int]]:
        """Every dispatch of the epoch (all ranks' indices), in order; deterministic, so cached per epoch."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        full, queues, plan = self.batch_size * self.num_replicas, {}, []
        for index in self._order(epoch):
            queue = queues.setdefault(self._bucket[index], [])
            queue.append(index)
            if len(queue) == full:
                plan.append(queue)
                queues[self._bucket[index]] = []
        if not self.drop_last:  # evaluation: every sample once, the last batch of a bucket may be short
            plan += [queue for queue in queues.values() if queue]
        self._plan_cache = (epoch, plan)  # one epoch only: bounded memory on large datasets
        return plan

    def __len__(self) -> int:
        """Batches this rank yields in the full current epoch (resume skips are not subtracted)."""
        return len(self._plan(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        epoch, plan = self.epoch, self._plan(self.epoch)
        skip = self._skip[1] if self._skip is not None and self._skip[0] == epoch else 0
        self._skip = None
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for step in range(skip, len(plan)):
            self._batches_done = step + 1  # counted before handing out: state_dict() then includes it
            yield plan[step][lo:hi]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self._batches_done, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume inside `state["epoch"]`: the next iteration of that epoch skips its first batches_done batches."""
        if state["seed"] != self.seed:
            raise ConfigError(f"seed: the checkpoint's sampler used {state['seed']}, this one {self.seed}; "
                              "they must match for an exact resume")
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        total = len(self._plan(epoch))
        if not 0 <= done <= total:
            raise ConfigError(f"batches_done: must be in [0, {total}] for epoch {epoch}, got {done}")
        self.epoch, self._batches_done, self._skip = epoch, done, (epoch, done)
