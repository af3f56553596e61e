"""The understanding-tower cache: a hit is, bit for bit, what the fill computed for that caption (alone, or in
its fill batch), misses run the tower, a changed tower misses, half-written or damaged shards are never read."""
from pathlib import Path

import pytest
import torch

from mos_lightning.model.understanding import UnderstandingTower
from mos_lightning.state_cache import StateCache, fill, tower_identity

CAPTIONS = ["a red circle", "two blue squares", "a green cross above a white diamond"]
# Every tower here names its dtype: the default ("auto") follows the hardware, and the dtype is part of the
# cache's identity. The cache stores bf16 whatever the tower computes in.


def _fill(root, dtype="bfloat16", batch_size=1) -> UnderstandingTower:
    tower = UnderstandingTower(dtype=dtype)
    cache = StateCache(root, tower_identity(tower))
    assert fill(tower, CAPTIONS, cache, batch_size=batch_size) == 3
    assert fill(tower, CAPTIONS, cache) == 0  # already there
    return tower


def _alone(tower, caption: str) -> torch.Tensor:
    """(m, L_i, D) of one caption encoded by itself. A caption's states depend on what else is padded into
    its batch (bf16: by up to 0.03 on valid tokens on an AVX2 CPU), so exact comparisons are alone vs alone."""
    states = tower.encode([caption])
    return states.hidden[0][:, states.mask[0]]


@pytest.fixture
def filled(tmp_path):
    """A bf16 cache of CAPTIONS filled one caption per batch: each cached caption is its alone-encoding."""
    return tmp_path, _fill(tmp_path)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_hits_equal_the_tower_and_skip_it(tmp_path, monkeypatch, dtype):
    direct = _fill(tmp_path, dtype)
    cached = UnderstandingTower(dtype=dtype, cache_dir=str(tmp_path))
    monkeypatch.setattr(cached, "encode", lambda captions: pytest.fail("the tower ran on a cache hit"))
    captions = CAPTIONS[::-1]  # one padded batch, unlike any batch the fill encoded
    got = cached(captions)
    assert (cached.cache_hits, cached.cache_misses) == (3, 0)
    for b, caption in enumerate(captions):
        # bit for bit on the valid tokens; a float32 tower reads the bf16 it wrote, cast back
        want = _alone(direct, caption).to(torch.bfloat16).to(getattr(torch, dtype))
        n = want.shape[1]
        assert got.hidden.dtype == want.dtype and got.mask[b].tolist() == [True] * n + [False] * (len(got.mask[b]) - n)
        assert torch.equal(got.hidden[b, :, :n], want), caption
        assert not got.hidden[b, :, n:].any()  # padding is zeros


def test_a_batched_fill_stores_what_the_tower_computed_for_that_batch(tmp_path):
    """fill(batch_size=2): one shard per batch, and each hit is its fill batch's encoding, bit for bit (the
    cache stores what the tower computed; it is the padding of the fill batch that shaped those states)."""
    direct = _fill(tmp_path, batch_size=2)
    assert len(list((tmp_path / tower_identity(direct)).glob("shard-*.safetensors"))) == 2
    cached = UnderstandingTower(dtype="bfloat16", cache_dir=str(tmp_path))
    for chunk in (CAPTIONS[:2], CAPTIONS[2:]):  # as fill batched them, in order
        got, want = cached(chunk), direct.encode(chunk)
        assert torch.equal(got.mask, want.mask)
        keep = want.mask[:, None, :, None]
        assert torch.equal(got.hidden * keep, want.hidden * keep)
    assert (cached.cache_hits, cached.cache_misses) == (3, 0)


def test_miss_runs_the_tower(filled):
    root, direct = filled
    cached = UnderstandingTower(dtype="bfloat16", cache_dir=str(root))
    captions = ["a purple triangle", CAPTIONS[0]]
    states = cached(captions)
    assert (cached.cache_hits, cached.cache_misses) == (1, 1)
    for b, caption in enumerate(captions):  # the one miss is encoded alone; the hit was filled alone
        want = _alone(direct, caption)
        assert torch.equal(states.hidden[b, :, :want.shape[1]], want), caption


def test_a_changed_tower_misses(filled):
    root, tower = filled
    for changed in (UnderstandingTower(dtype="bfloat16", cache_dir=str(root), num_layers=3),
                    UnderstandingTower(dtype="bfloat16", cache_dir=str(root), max_length=8),
                    UnderstandingTower(dtype="float32", cache_dir=str(root))):
        assert tower_identity(changed) != tower_identity(tower)
        changed(CAPTIONS)
        assert (changed.cache_hits, changed.cache_misses) == (0, 3)


def test_half_written_and_damaged_shards_are_never_read(filled, caplog):
    root, tower = filled
    folder = Path(root) / tower_identity(tower)
    (folder / ".tmp-shard-killed.safetensors").write_bytes(b"\x00" * 100)  # a pass killed mid-write
    (folder / "shard-damaged.safetensors").write_bytes(b"\xff" * 64)
    cache = StateCache(root, tower_identity(tower))
    assert len(cache) == 3 and "shard-damaged" in caplog.text
    assert all(c in cache for c in CAPTIONS)


def test_cache_subcommand_then_fit_reads_it(tmp_path):
    from mos_lightning.cli import cli_main
    from mos_lightning.state_cache import MEMOS

    MEMOS.clear()  # earlier fits in this process memoised these captions: the memo would answer before the disk

    root = Path(__file__).resolve().parents[1]
    configs = ["--config", str(root / "experiments" / "router_inputs.yaml"),
               "--config", str(root / "tests" / "tiny.yaml")]
    report = cli_main(["cache", *configs, "--cache_dir", str(tmp_path / "cache")])
    assert report["written"] == report["captions"] == report["cached"] > 0
    rows = cli_main(["fit", *configs, "--arm", "prompt", f"--trainer.logger.init_args.save_dir={tmp_path}",
                     "--trainer.callbacks=[]",  # the sample grid's prompts are not in the data
                     f"--model.understanding.init_args.cache_dir={tmp_path / 'cache'}"])
    assert rows[0]["cache_hit_rate"] == 1.0  # every caption of training and validation came from disk
