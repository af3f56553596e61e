"""Image-caption corpora on disk: a folder, a manifest, or streamed WebDataset tar shards.

Every source yields the same item as ShapesDataset, (image (3, H, W) in [-1, 1], caption, category), so the
shapes `collate` and everything downstream work unchanged. Bad samples are skipped and counted in `.skipped`.

Map-style sources must return something from __getitem__, so a bad sample i is replaced by the next good one
(i+1, i+2, ... wrapping, at most `max_tries`): deterministic, so workers and re-runs agree. Good samples
therefore appear slightly more often than once per epoch when bad ones sit before them.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from mos_lightning.data.buckets import nearest_bucket
from mos_lightning.data.images import DEFAULT_MAX_PIXELS, SkipCounter, check_size, header_size, image_tensor
from mos_lightning.data.shapes import collate
from mos_lightning.errors import ConfigError
from mos_lightning.types import Batch

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
Item = tuple[torch.Tensor, str, str]


def _check_tries(max_tries: int) -> int:
    if not isinstance(max_tries, int) or isinstance(max_tries, bool) or max_tries < 1:
        raise ConfigError(f"max_tries: must be an int >= 1, got {max_tries!r}")
    return max_tries


class MapSource(Dataset):
    """Shared map-style logic; subclasses fill `self.paths` and implement `caption(i)` and `category(i)`."""

    def __init__(self, image_size: int | Sequence[int] = 256, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_tries: int = 16):
        self.image_size = check_size(image_size)
        self.max_pixels = max_pixels
        self.max_tries = _check_tries(max_tries)
        self.skipped = SkipCounter()
        self.paths: list[Path] = []
        self._bad: set[int] = set()  # known-bad indices, so a revisit costs nothing
        self.buckets: list[tuple[int, int]] | None = None  # set by a bucketing DataModule

    def __len__(self) -> int:
        return len(self.paths)

    def caption(self, i: int) -> str | None:
        raise NotImplementedError

    def category(self, i: int) -> str:
        return ""

    def size_of(self, i: int) -> tuple[int, int] | None:
        """Original (H, W) from the file header without decoding (for bucket samplers); None if unreadable."""
        return header_size(self.paths[i])

    def target_size(self, i: int) -> tuple[int, int]:
        """The (H, W) sample i is cropped to: its nearest bucket when bucketing, else image_size."""
        size = self.size_of(i) if self.buckets else None
        return self.image_size if size is None else nearest_bucket(*size, self.buckets)

    def load(self, i: int, size: tuple[int, int] | None = None) -> Item | None:
        """Sample i exactly (cropped to `size`, default its target size), or None (counted once) if bad."""
        if i in self._bad:
            return None
        text = self.caption(i)
        if text is None or not text.strip():
            self.skipped.add("no_caption", key=i, detail=str(self.paths[i]))
            self._bad.add(i)
            return None
        image = image_tensor(self.paths[i], size or self.target_size(i), self.skipped, key=i,
                             max_pixels=self.max_pixels)
        if image is None:
            self._bad.add(i)
            return None
        return image, text.strip(), self.category(i)

    def __getitem__(self, i: int) -> Item:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {type(self).__name__} of length {n}")
        size = self.target_size(i)  # a stand-in for a bad sample keeps the batch's bucket shape
        for k in range(min(self.max_tries, n)):
            item = self.load((i + k) % n, size)
            if item is not None:
                return item
        raise RuntimeError(f"{type(self).__name__}: {self.max_tries} bad samples in a row from index {i} "
                           f"({self.skipped.summary()}); check the data or raise max_tries")


def _check_dir(root, name: str) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise ConfigError(f"{name}: {str(root)!r} is not a directory")
    return path


class FolderDataset(MapSource):
    """Images (jpg/jpeg/png/webp, any depth) each with a same-stem `.txt` caption; no caption -> skipped."""

    def __init__(self, root, image_size: int | Sequence[int] = 256, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_tries: int = 16):
        super().__init__(image_size, max_pixels, max_tries)
        self.root = _check_dir(root, "root")
        self.paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())

    def caption(self, i: int) -> str | None:
        try:
            return self.paths[i].with_suffix(".txt").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None


def _jsonl_records(path: Path, skipped: SkipCounter) -> Iterator[tuple[int, object]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError:
                skipped.add("bad_record", key=n, detail=f"{path}:{n}: not JSON")


def _csv_records(path: Path) -> Iterator[tuple[int, object]]:
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.DictReader(f)
        if not {"image", "caption"} <= set(reader.fieldnames or ()):
            raise ConfigError(f"manifest: CSV {str(path)!r} needs a header with columns image,caption; "
                              f"got {reader.fieldnames}")
        for row in reader:
            yield reader.line_num, row


class ManifestDataset(MapSource):
    """A JSONL ({"image": path, "caption": text} per line) or CSV (header image,caption) manifest.

    Relative paths resolve against `image_root`, else the manifest's folder. Records that are not JSON or lack
    a string image/caption are skipped at construction as "bad_record"; empty captions as "no_caption".
    """

    def __init__(self, manifest, image_root=None, image_size: int | Sequence[int] = 256,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_tries: int = 16):
        super().__init__(image_size, max_pixels, max_tries)
        self.manifest = Path(manifest)
        if not self.manifest.is_file():
            raise ConfigError(f"manifest: {str(manifest)!r} is not a file (expected .jsonl or .csv)")
        base = self.manifest.parent if image_root is None else _check_dir(image_root, "image_root")
        suffix = self.manifest.suffix.lower()
        if suffix not in (".jsonl", ".json", ".csv"):
            raise ConfigError(f"manifest: suffix {suffix!r} not understood; allowed: .jsonl, .json, .csv")
        rows = _csv_records(self.manifest) if suffix == ".csv" else _jsonl_records(self.manifest, self.skipped)
        self.captions: list[str] = []
        for n, rec in rows:
            self._add(n, rec, base)

    def _add(self, n: int, rec, base: Path) -> None:
        image, text = (rec.get("image"), rec.get("caption")) if isinstance(rec, dict) else (None, None)
        if not isinstance(image, str) or not image or not isinstance(text, str):
            self.skipped.add("bad_record", key=("line", n), detail=f"{self.manifest}:{n}: needs image and caption")
        elif not text.strip():
            self.skipped.add("no_caption", key=("line", n), detail=f"{self.manifest}:{n}")
        else:
            self.paths.append(base / image)  # an absolute `image` wins over base
            self.captions.append(text)

    def caption(self, i: int) -> str | None:
        return self.captions[i]


class ShardDataset(IterableDataset):
    """WebDataset tar shards (`<key>.jpg|jpeg|png|webp` + `<key>.txt`), streamed through `webdataset`.

    `urls` is a brace pattern ("data-{000..009}.tar"), a path, or a list. Shards are split across nodes and
    DataLoader workers by webdataset; each worker has its own `.skipped` copy (see SkipCounter). A tar that
    cannot be read is counted as "bad_shard" and streaming goes on with the next shard.

    Bucketed (a DataModule with bucket_base sets `buckets`): each item goes online to the bucket nearest its
    aspect ratio, from the image header, and the stream yields whole one-shape batches. `batches_per_epoch`
    makes every rank yield exactly that many (repeating its shards as needed): under DDP, ranks holding
    different amounts of data would otherwise end the epoch at different steps and stall the gradient sync.
    """

    def __init__(self, urls: str | Sequence[str], image_size: int | Sequence[int] = 256,
                 max_pixels: int = DEFAULT_MAX_PIXELS, shardshuffle: bool | int = False,
                 batches_per_epoch: int | None = None):
        if isinstance(urls, (str, os.PathLike)):
            urls = str(urls)
        elif not urls:
            raise ConfigError("urls: need at least one shard path or brace pattern")
        else:
            urls = [str(u) for u in urls]
        self.urls = urls
        self.image_size = check_size(image_size)
        self.max_pixels = max_pixels
        self.shardshuffle = shardshuffle
        if batches_per_epoch is not None and (not isinstance(batches_per_epoch, int) or batches_per_epoch < 1):
            raise ConfigError(f"batches_per_epoch: must be an int >= 1 or null, got {batches_per_epoch!r}")
        self.batches_per_epoch = batches_per_epoch
        self.skipped = SkipCounter()
        # Set by a bucketing DataModule: the stream then yields whole Batches of one bucket shape.
        self.buckets: list[tuple[int, int]] | None = None
        self.batch_size, self.drop_last = 1, True

    def _bad_shard(self, err: Exception) -> bool:
        self.skipped.add("bad_shard", detail=repr(err))
        return True  # webdataset: keep going

    def _samples(self):
        import webdataset as wds  # optional dependency: only shard users need it

        return wds.WebDataset(self.urls, shardshuffle=self.shardshuffle, handler=self._bad_shard,
                              nodesplitter=wds.split_by_node, empty_check=False)

    def _item(self, sample: dict) -> Item | None:
        fields = {k.lower(): v for k, v in sample.items() if isinstance(k, str)}
        key = f"{fields.get('__url__', '')}:{fields.get('__key__', '')}"
        data = next((fields[e[1:]] for e in IMAGE_EXTS if e[1:] in fields), None)
        text = fields.get("txt")
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        if data is None:
            self.skipped.add("no_image", key=key, detail=key)
            return None
        if not text or not text.strip():
            self.skipped.add("no_caption", key=key, detail=key)
            return None
        size = header_size(bytes(data)) if self.buckets else None  # nearest bucket, from the header alone
        target = self.image_size if size is None else nearest_bucket(*size, self.buckets)
        image = image_tensor(bytes(data), target, self.skipped, key=key, max_pixels=self.max_pixels)
        return None if image is None else (image, text.strip(), "")

    def _items(self, repeat: bool) -> Iterator[Item]:
        """Good items of this worker's shards; with `repeat`, pass after pass (a pass with none stops)."""
        while True:
            found = False
            for sample in self._samples():
                item = self._item(sample)
                if item is not None:
                    found = True
                    yield item
            if not (repeat and found):
                return

    def _budget(self) -> int | None:
        """This DataLoader worker's share of batches_per_epoch (equal counts per rank keep DDP in step)."""
        if self.batches_per_epoch is None:
            return None
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        return self.batches_per_epoch // workers + (worker < self.batches_per_epoch % workers)

    def _bucketed(self) -> Iterator[Batch]:
        """Online bucketing (App. A): each item joins its bucket's queue; a full queue is one batch."""
        budget, queues, sent = self._budget(), {}, 0
        if budget == 0:
            return
        for item in self._items(repeat=budget is not None):
            queue = queues.setdefault(tuple(item[0].shape[-2:]), [])
            queue.append(item)
            if len(queue) == self.batch_size:
                yield collate(queue)
                queue.clear()
                sent += 1
                if sent == budget:
                    return
        if not self.drop_last:
            yield from (collate(q) for q in queues.values() if q)

    def __iter__(self) -> Iterator[Item] | Iterator[Batch]:
        return self._bucketed() if self.buckets else self._items(repeat=False)
