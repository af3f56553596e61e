"""A DataModule over any image-caption source (folder, manifest, MJHQ, shards), with buckets."""
from __future__ import annotations

from typing import Sequence

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset, IterableDataset

from mos_lightning.data.buckets import bucket_table
from mos_lightning.data.resume import ResumableTrainData
from mos_lightning.data.shapes import CATEGORIES, ShapesDataset, collate
from mos_lightning.errors import ConfigError


class ImageCaptionDataModule(ResumableTrainData, L.LightningDataModule):
    """Trains on `train` (and validates on `val`) from any source chosen by class_path.

    Args:
        train, val: datasets such as FolderDataset, ManifestDataset, MJHQDataset or ShardDataset.
        bucket_base: when set, sources are bucketed by aspect ratio (App. A): each sample is
            cropped to its nearest bucket of area ~bucket_base^2 and batches never mix shapes
            (map-style through BucketBatchSampler, streams online); None crops everything to the
            source's image_size.
        bucket_multiple: bucket sides are multiples of this; it must be a multiple of patch size x autoencoder
            factor. None: exactly that, set by the CLI from the model (`use_multiple`).
        seed: shuffling and bucket order.
    """

    def __init__(self, train: Dataset, val: Dataset | None = None, batch_size: int = 32, num_workers: int = 0,
                 bucket_base: int | None = None, bucket_multiple: int | None = None, max_ratio: float = 2.0,
                 seed: int = 0):
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["train", "val"])  # the CLI logs HParams per arm
        if batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size} must be >= 1")
        self.train_set, self.val_set = train, val
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.bucket_base, self.bucket_multiple, self.max_ratio = bucket_base, bucket_multiple, max_ratio
        self.buckets = None
        if bucket_base and bucket_multiple is not None:
            self.buckets = bucket_table(bucket_base, bucket_multiple, max_ratio)
        self.image_size = (bucket_base, bucket_base) if bucket_base else getattr(train, "image_size", None)

    def use_multiple(self, unit: int) -> None:
        """The model's patch size x autoencoder factor: bucket sides must be multiples of it."""
        if self.bucket_multiple is None:
            self.bucket_multiple = unit
            if self.bucket_base:
                self.buckets = bucket_table(self.bucket_base, unit, self.max_ratio)
        elif self.bucket_base and self.bucket_multiple % unit:
            raise ConfigError(f"data.bucket_multiple={self.bucket_multiple} is not a multiple of "
                              f"model.generation.patch_size x autoencoder factor = {unit}; set it to a multiple "
                              f"of {unit}, or null to take {unit}")

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        """Every shape a batch can have (the CLI checks each against the patch size)."""
        self._check_buckets()
        return self.buckets or [self.image_size]

    def _check_buckets(self) -> None:
        if self.bucket_base and self.buckets is None:
            raise ConfigError("data.bucket_multiple is null and no model gave its patch size x autoencoder factor; "
                              "set data.bucket_multiple, or build the DataModule through the CLI")

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        self._check_buckets()
        common = {"num_workers": self.num_workers, "collate_fn": collate, "persistent_workers": self.num_workers > 0}
        if isinstance(dataset, IterableDataset):
            if self.buckets is None:
                return DataLoader(dataset, batch_size=self.batch_size, **common)
            dataset.buckets, dataset.batch_size, dataset.drop_last = self.buckets, self.batch_size, train
            return DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                              persistent_workers=self.num_workers > 0)  # the stream yields whole batches
        if self.buckets is None:
            return DataLoader(dataset, batch_size=self.batch_size, shuffle=train, drop_last=train, **common)
        dataset.buckets = self.buckets
        sizes = [dataset.size_of(i) or self.image_size for i in range(len(dataset))]
        return self.bucket_loader(dataset, sizes, self.buckets, train, collate, self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def every_image(self, split: str) -> DataLoader | list:
        """`split`'s samples in order, each once, cropped as training crops them (what `cache` encodes)."""
        dataset = {"train": self.train_set, "val": self.val_set}[split]
        return [] if dataset is None else self._loader(dataset, train=False)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else self._loader(self.val_set, train=False)

    def skipped_summary(self) -> str:
        """How many samples each split skipped and why (in-process counts; workers count their own)."""
        splits = (("train", self.train_set), ("val", self.val_set))
        parts = [f"{name}: {data.skipped.summary()}" for name, data in splits
                 if data is not None and hasattr(data, "skipped")]
        return "; ".join(parts)


class BucketedShapesDataset(Dataset):
    """The shapes domain at several aspect ratios: sample i's canvas is one bucket of `table`,
    drawn by (seed, i), so the default run exercises the bucket sampler (App. A). `object_scale`: as
    ShapesDataModule's."""

    def __init__(self, length: int, seed: int = 0, base: int = 32, multiple: int = 8, max_ratio: float = 2.0,
                 categories: Sequence[str] = CATEGORIES, object_scale: float = 1.0):
        self.table = bucket_table(base, multiple, max_ratio)
        self.seed, self.length = seed, length
        self.canvases = {size: ShapesDataset(length, seed, size, categories, object_scale) for size in self.table}
        pick = np.random.default_rng([seed, 7]).integers(0, len(self.table), length)  # one draw, deterministic
        self.sizes = [self.table[k] for k in pick]
        self.image_size = (base, base)

    def __len__(self) -> int:
        return self.length

    def size_of(self, i: int) -> tuple[int, int]:
        return self.sizes[i]

    def caption_at(self, i: int) -> str:
        return self.canvases[self.sizes[i]].caption_at(i)

    def __getitem__(self, i: int):
        return self.canvases[self.sizes[i]][i]
