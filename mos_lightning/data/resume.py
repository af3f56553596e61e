"""Exact mid-epoch resume for DataModules whose train loader is a BucketBatchSampler.

Lightning saves `datamodule.state_dict()` in every checkpoint and hands it back through `load_state_dict` on
`fit --ckpt_path` before it asks for the train loader. The sampler's own count of handed-out batches runs ahead
of training (DataLoader workers and Lightning's fetcher prefetch), so the checkpoint stores the trainer's count:
the batches this epoch that reached a training step. The resumed sampler skips exactly those.
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

from torch.utils.data import DataLoader, Dataset

from mos_lightning.data.buckets import BucketBatchSampler

# Lightning warns on any mid-epoch resume of a DataLoader without its own state_dict; ours resumes through
# the DataModule, so the warning would be wrong.
_NOT_RESUMABLE = "You're resuming from a checkpoint that ended before the epoch ended"


class ResumableTrainData:
    """Mixin for a LightningDataModule: checkpoints carry the train sampler's position."""

    _train_sampler: BucketBatchSampler | None = None
    _pending_sampler_state: dict | None = None

    def bucket_loader(self, dataset: Dataset, sizes: Sequence[tuple[int, int]], table: Sequence[tuple[int, int]],
                      train: bool, collate_fn: Callable, num_workers: int = 0) -> DataLoader:
        """A loader over batches of one bucket shape; the train one is sharded across ranks and resumes from a
        loaded checkpoint, the val one yields every sample once on every rank."""
        # Validation is not sharded: every rank scores the whole set, so val metrics need no cross-rank sync.
        shard = {} if train else {"num_replicas": 1, "rank": 0, "drop_last": False}
        sampler = BucketBatchSampler(sizes, self.batch_size, table, seed=self.seed, shuffle=train, **shard)
        if train:
            if self._pending_sampler_state is not None:
                sampler.load_state_dict(self._pending_sampler_state)
                self._pending_sampler_state = None
            self._train_sampler = sampler
        return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_fn,
                          persistent_workers=num_workers > 0)

    def state_dict(self) -> dict:
        trainer = getattr(self, "trainer", None)
        if self._train_sampler is None or trainer is None:
            return {}
        trained = trainer.fit_loop.epoch_loop.batch_progress.current.ready  # batches that reached training_step
        state = self._train_sampler.state_dict()
        return {"sampler": {**state, "epoch": trainer.current_epoch, "batches_done": trained}}

    def load_state_dict(self, state: dict) -> None:
        self._pending_sampler_state = state.get("sampler")
        if self._pending_sampler_state is not None:
            warnings.filterwarnings("ignore", message=_NOT_RESUMABLE)
