"""The understanding-tower cache: hits equal the tower, misses run it, a changed tower misses,
half-written or damaged shards are never read."""
from pathlib import Path

import pytest
import torch

from mos_lightning.model.understanding import UnderstandingTower
from mos_lightning.state_cache import StateCache, fill, tower_identity

CAPTIONS = ["a red circle", "two blue squares", "a green cross above a white diamond"]


@pytest.fixture
def filled(tmp_path):
    tower = UnderstandingTower()  # bf16, as cached
    cache = StateCache(tmp_path, tower_identity(tower))
    assert fill(tower, CAPTIONS, cache, batch_size=2) == 3
    assert fill(tower, CAPTIONS, cache) == 0  # already there
    return tmp_path, tower


def test_hits_equal_the_tower_and_skip_it(filled, monkeypatch):
    root, direct = filled
    cached = UnderstandingTower(cache_dir=str(root))
    monkeypatch.setattr(cached, "encode", lambda captions: pytest.fail("the tower ran on a cache hit"))
    got, want = cached(CAPTIONS[::-1]), direct.encode(CAPTIONS[::-1])
    assert torch.equal(got.mask, want.mask)
    keep = want.mask[:, None, :, None]
    assert torch.equal(got.hidden * keep, want.hidden * keep)
    assert (cached.cache_hits, cached.cache_misses) == (3, 0)


def test_miss_runs_the_tower(filled):
    root, direct = filled
    cached = UnderstandingTower(cache_dir=str(root))
    states = cached(["a purple triangle", CAPTIONS[0]])
    assert (cached.cache_hits, cached.cache_misses) == (1, 1)
    want = direct.encode(["a purple triangle"])
    n = int(want.mask.sum())
    assert torch.equal(states.hidden[0, :, :n], want.hidden[0, :, :n])


def test_a_changed_tower_misses(filled):
    root, tower = filled
    for changed in (UnderstandingTower(cache_dir=str(root), num_layers=3),
                    UnderstandingTower(cache_dir=str(root), max_length=8)):
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

    root = Path(__file__).resolve().parents[1]
    configs = ["--config", str(root / "experiments" / "router_inputs.yaml"), "--config", str(root / "tests" / "tiny.yaml")]
    report = cli_main(["cache", *configs, "--cache_dir", str(tmp_path / "cache")])
    assert report["written"] == report["captions"] == report["cached"] > 0
    rows = cli_main(["fit", *configs, "--arm", "prompt", f"--trainer.logger.init_args.save_dir={tmp_path}",
                     "--trainer.callbacks=[]",  # the sample grid's prompts are not in the data
                     f"--model.understanding.init_args.cache_dir={tmp_path / 'cache'}"])
    assert rows[0]["cache_hit_rate"] == 1.0  # every caption of training and validation came from disk
