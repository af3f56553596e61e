import math
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from mos_lightning.data.buckets import BucketBatchSampler, bucket_table, nearest_bucket, resize_center_crop
from mos_lightning.errors import ConfigError


def _randint(rng, lo, hi):
    """An int in [lo, hi] from the test's torch generator."""
    return int(torch.randint(lo, hi + 1, (1,), generator=rng))


def _random_sizes(rng, n):
    """Original (H, W) sizes spread over aspect ratios from 1:3 to 3:1."""
    log_ratio = (torch.rand(n, generator=rng) * 2 - 1) * math.log(3)
    side = 64 + torch.rand(n, generator=rng) * 960
    return [(max(1, int(s * math.exp(r / 2))), max(1, int(s * math.exp(-r / 2)))) for s, r in zip(side, log_ratio)]


def _table(rng):
    multiple = 8 * _randint(rng, 1, 4)
    return bucket_table(multiple * _randint(rng, 4, 12), multiple)


def test_bucket_table_properties(rng):
    for _ in range(20):
        multiple = _randint(rng, 1, 64)
        base = multiple * _randint(rng, 1, 24)
        max_ratio = 1 + 3 * float(torch.rand(1, generator=rng))
        table = bucket_table(base, multiple, max_ratio)
        assert (base, base) in table
        assert len(set(table)) == len(table)
        ratios = [w / h for h, w in table]
        assert ratios == sorted(ratios)
        for h, w in table:
            assert h % multiple == 0 and w % multiple == 0
            assert abs(h * w - base * base) <= 0.1 * base * base
            assert 1 / max_ratio - 1e-6 <= w / h <= max_ratio + 1e-6
            assert (w, h) in table


def test_bucket_table_off_grid_base_is_not_empty(rng):
    multiple = _randint(rng, 2, 32)
    base = multiple * _randint(rng, 1, 10) + _randint(rng, 1, multiple - 1)
    table = bucket_table(base, multiple)
    assert table and all(h % multiple == 0 and w % multiple == 0 for h, w in table)


def test_eval_mode_yields_every_sample_once_in_one_shape_batches(rng):
    sizes, table = _random_sizes(rng, _randint(rng, 50, 300)), _table(rng)
    batch_size = _randint(rng, 2, 9)
    sampler = BucketBatchSampler(sizes, batch_size, table, shuffle=False, drop_last=False)
    batches = _epoch(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(sizes)))
    assert len(sampler) == len(batches)
    for batch in batches:
        assert 0 < len(batch) <= batch_size and len({nearest_bucket(*sizes[i], table) for i in batch}) == 1
    short = [b for b in batches if len(b) < batch_size]
    assert len(short) <= len(table)  # at most one partial batch per bucket


@pytest.mark.parametrize("kwargs, setting", [
    (dict(base=8, multiple=16), "base"), (dict(base=64, multiple=0), "multiple"),
    (dict(base=64, multiple=16, max_ratio=0.5), "max_ratio")])
def test_bucket_table_bad_args(kwargs, setting):
    with pytest.raises(ConfigError, match=setting):
        bucket_table(**kwargs)


def test_nearest_bucket_matches_brute_force(rng):
    table = _table(rng)
    for h, w in _random_sizes(rng, 300):
        got = nearest_bucket(h, w, table)
        dists = {b: abs(math.log(h / w) - math.log(b[0] / b[1])) for b in table}
        best = min(dists.values())
        assert got in table and dists[got] <= best + 1e-9
        tied = [b for b in table if dists[b] <= best + 1e-9]
        assert got[0] * got[1] == max(b[0] * b[1] for b in tied)  # ties go to the larger area


def test_nearest_bucket_square_and_deterministic():
    table = bucket_table(256, 16)
    assert nearest_bucket(500, 500, table) == (256, 256)
    assert nearest_bucket(100, 300, table) == nearest_bucket(100, 300, list(reversed(table)))


@pytest.mark.parametrize("orientation", ["wide", "tall", "square"])
def test_resize_center_crop_exact_size(rng, orientation):
    table = _table(rng)
    long, short = _randint(rng, 40, 400), _randint(rng, 20, 40)
    w, h = {"wide": (long, short), "tall": (short, long), "square": (short, short)}[orientation]
    image = Image.new("RGB", (w, h), (10, 200, 30))
    for bucket in (table[0], table[len(table) // 2], table[-1], nearest_bucket(h, w, table)):
        out = resize_center_crop(image, bucket)
        assert out.size == (bucket[1], bucket[0])  # PIL is (W, H)


def _epoch(sampler):
    return [list(b) for b in sampler]


def test_batches_share_one_bucket_and_len_is_exact(rng):
    sizes, table = _random_sizes(rng, 500), _table(rng)
    batch_size = _randint(rng, 1, 8)
    sampler = BucketBatchSampler(sizes, batch_size, table, seed=_randint(rng, 0, 10**6))
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = _epoch(sampler)
        assert len(sampler) == len(batches) > 0
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat))
        for batch in batches:
            assert len(batch) == batch_size
            assert len({nearest_bucket(*sizes[i], table) for i in batch}) == 1
            assert len({sampler.bucket_of(i) for i in batch}) == 1


def test_seed_determinism_and_epoch_variation(rng):
    sizes, table = _random_sizes(rng, 300), _table(rng)
    seed = _randint(rng, 0, 10**6)
    a, b = BucketBatchSampler(sizes, 4, table, seed=seed), BucketBatchSampler(sizes, 4, table, seed=seed)
    assert _epoch(a) == _epoch(b)
    assert _epoch(BucketBatchSampler(sizes, 4, table, seed=seed + 1)) != _epoch(a)
    first = _epoch(a)
    a.set_epoch(1)
    assert _epoch(a) != first


def test_no_shuffle_is_dataset_order(rng):
    sizes, table = _random_sizes(rng, 200), _table(rng)
    sampler = BucketBatchSampler(sizes, 3, table, shuffle=False)
    sampler.set_epoch(5)
    batches = _epoch(sampler)
    assert batches == _epoch(BucketBatchSampler(sizes, 3, table, shuffle=False))
    assert all(b == sorted(b) for b in batches)
    assert [b[-1] for b in batches] == sorted(b[-1] for b in batches)  # dispatched in order of filling


def test_ddp_lock_step_without_processes(rng):
    sizes, table = _random_sizes(rng, 400), _table(rng)
    batch_size, seed = _randint(rng, 1, 6), _randint(rng, 0, 10**6)
    ranks = [BucketBatchSampler(sizes, batch_size, table, seed=seed, num_replicas=2, rank=r) for r in (0, 1)]
    for epoch in (0, 1):
        for s in ranks:
            s.set_epoch(epoch)
        r0, r1 = _epoch(ranks[0]), _epoch(ranks[1])
        assert len(r0) == len(r1) == len(ranks[0]) == len(ranks[1]) > 0
        assert [ranks[0].bucket_of(b[0]) for b in r0] == [ranks[1].bucket_of(b[0]) for b in r1]
        assert not {i for b in r0 for i in b} & {i for b in r1 for i in b}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, port, out_path, sizes, table):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        sampler = BucketBatchSampler(sizes, 3, table, seed=7)  # rank and world from torch.distributed
        shapes = [sampler.bucket_of(b[0]) for b in sampler]
        indices = [i for b in sampler for i in b]
        gathered = [None, None]
        torch.distributed.all_gather_object(gathered, (sampler.rank, sampler.num_replicas, shapes, indices))
        if rank == 0:
            (r0, w0, s0, i0), (r1, w1, s1, i1) = gathered
            ok = (r0, r1, w0, w1) == (0, 1, 2, 2) and s0 == s1 and len(s0) > 0 and not set(i0) & set(i1)
            with open(out_path, "w") as f:
                f.write(f"{ok} {len(s0)}")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_lock_step_two_processes(rng, tmp_path):
    """Two real gloo processes. Fork, not spawn, where available: spawned children re-import lightning via
    mos_lightning.data (~6 s each on 2 cores, 13-19 s in all); forked ones start in ~0.2 s. The workers still
    init their own process group and the sampler reads rank and world size from torch.distributed."""
    sizes, table = _random_sizes(rng, 300), _table(rng)
    out = tmp_path / "ddp.txt"
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_ddp_worker, args=(_free_port(), str(out), sizes, table), nprocs=2, join=True,
                       start_method=method)
    ok, steps = out.read_text().split()
    assert ok == "True" and int(steps) > 0


def _take(sampler, k):
    it, got = iter(sampler), []
    for _ in range(k):
        got.append(list(next(it)))
    return got


def test_exact_mid_epoch_resume(rng):
    sizes, table = _random_sizes(rng, 400), _table(rng)
    seed, replicas = _randint(rng, 0, 10**6), _randint(rng, 1, 2)

    def make():
        return BucketBatchSampler(sizes, 2, table, seed=seed, num_replicas=replicas, rank=replicas - 1)

    for epoch in (0, 3):
        full = make()
        full.set_epoch(epoch)
        expected = _epoch(full)
        k = _randint(rng, 0, len(expected))
        first = make()
        first.set_epoch(epoch)
        head = _take(first, k)
        state = first.state_dict()
        assert state == {"epoch": epoch, "batches_done": k, "seed": seed}
        resumed = make()
        resumed.load_state_dict(state)
        resumed.set_epoch(epoch)  # Lightning calls set_epoch again at the resumed epoch's start
        assert len(resumed) == len(expected)  # full epoch, skipped batches included
        assert head + _epoch(resumed) == expected
        resumed.set_epoch(epoch + 1)  # next epoch is untouched by the resume
        full.set_epoch(epoch + 1)
        assert _epoch(resumed) == _epoch(full)


def test_resume_state_across_set_epoch(rng):
    sizes, table = _random_sizes(rng, 300), _table(rng)
    sampler = BucketBatchSampler(sizes, 2, table, seed=1)
    _epoch(sampler)
    sampler.set_epoch(1)
    assert sampler.state_dict() == {"epoch": 1, "batches_done": 0, "seed": 1}
    head = _take(sampler, 2)
    resumed = BucketBatchSampler(sizes, 2, table, seed=1)
    resumed.load_state_dict(sampler.state_dict())
    sampler.set_epoch(1)
    assert head + _epoch(resumed) == _epoch(sampler)


@pytest.mark.parametrize("kwargs, setting", [
    (dict(batch_size=0), "batch_size"), (dict(sizes=[]), "sizes"), (dict(rank=2, num_replicas=2), "rank"),
    (dict(rank=-1, num_replicas=2), "rank"), (dict(num_replicas=0, rank=0), "num_replicas"),
    (dict(drop_last=False, num_replicas=2, rank=0), "drop_last")])
def test_sampler_bad_args(kwargs, setting):
    args = dict(sizes=[(64, 32), (32, 64)], batch_size=1, table=bucket_table(64, 16)) | kwargs
    with pytest.raises(ConfigError, match=setting):
        BucketBatchSampler(**args)


def test_resume_rejects_other_seed_and_out_of_range():
    sampler = BucketBatchSampler([(64, 64)] * 8, 2, bucket_table(64, 16), seed=3)
    with pytest.raises(ConfigError, match="seed"):
        sampler.load_state_dict({"epoch": 0, "batches_done": 1, "seed": 4})
    with pytest.raises(ConfigError, match="batches_done"):
        sampler.load_state_dict({"epoch": 0, "batches_done": 5, "seed": 3})


def test_dataloader_batches_stack_into_one_shape(rng):
    """End to end: as a DataLoader batch_sampler, every batch of real images resizes to one stackable shape."""
    sizes, table = _random_sizes(rng, 60), bucket_table(32, 8)
    sampler = BucketBatchSampler(sizes, 3, table, seed=_randint(rng, 0, 10**6))

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(sizes)

        def __getitem__(self, i):
            h, w = sizes[i]
            image = resize_center_crop(Image.new("RGB", (w // 8 + 1, h // 8 + 1)), sampler.bucket_of(i))
            return torch.from_numpy(np.asarray(image)).permute(2, 0, 1)  # (3, H, W)

    batches = list(torch.utils.data.DataLoader(Images(), batch_sampler=sampler))
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        assert batch.shape[0] == 3 and tuple(batch.shape[2:]) in table  # (B, 3, H, W)
