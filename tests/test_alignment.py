"""REPA alignment: targets are the shapes-CLIP ViT's patch features on the tower's token grid, the loss is
1 - cosine as written by hand, and its gradient reaches the projector and the blocks up to the aligned one only."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mos_lightning.alignment import Repa
from mos_lightning.errors import ConfigError
from mos_lightning.lit import MoSModule
from mos_lightning.model.generation import GenerationTower
from mos_lightning.types import Batch

ROOT = Path(__file__).resolve().parents[1]


def _module(minilm, block=0):
    return MoSModule(understanding=minilm, generation=GenerationTower(width=32, depth=3, heads=2, patch_size=4),
                     repa=Repa(block=block, weight=0.5, hidden=16))


def test_targets_on_the_encoders_own_grid_are_its_patch_tokens(minilm, rng):
    repa = _module(minilm).repa
    visual, _ = repa._frozen
    images = torch.rand(3, 3, 32, 32, generator=rng) * 2 - 1
    _, tokens = visual(images)
    torch.testing.assert_close(repa.targets(images, (8, 8)), tokens, rtol=1e-5, atol=1e-5)
    assert repa.targets(torch.rand(2, 3, 24, 40, generator=rng), (6, 10)).shape == (2, 60, tokens.shape[-1])


def test_loss_is_one_minus_cosine_and_trains_only_up_to_its_block(minilm, rng):
    module = _module(minilm, block=1)
    images = torch.rand(2, 3, 32, 32, generator=rng) * 2 - 1
    batch = Batch(images, ["a red circle", "two blue squares"], ["single_object", "counting"])
    t = torch.rand(2, generator=rng)
    flow = module.loss(batch, t).mean()
    hidden = module.repa._captured["tokens"]
    projected = module.repa.projector(hidden[:, -64:].float())
    target = module.repa.targets(images, (8, 8))
    by_hand = 1 - (F.normalize(projected, dim=-1) * F.normalize(target, dim=-1)).sum(-1).mean(1)
    alignment = module.repa.loss(images, module.latent_grid)
    torch.testing.assert_close(alignment, by_hand)
    (flow * 0 + alignment.mean()).backward()
    blocks = module.model.generation.blocks
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.repa.projector.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in blocks[1].parameters() if p.ndim == 2)
    later = [p.grad for p in blocks[2].parameters()]
    assert all(g is None or not g.any() for g in later)  # the block after the aligned one: no REPA gradient


def test_the_projector_is_optimised_and_the_encoder_is_not_saved(minilm):
    module = _module(minilm)
    module.trainer = type("T", (), {"estimated_stepping_batches": 10})()
    optimiser = module.configure_optimizers()["optimizer"]
    ids = {id(p) for group in optimiser.param_groups for p in group["params"]}
    assert all(id(p) in ids for p in module.repa.projector.parameters())
    assert not any("visual" in k for k in module.state_dict())


def test_a_block_past_the_tower_is_a_clear_error(minilm):
    with pytest.raises(ConfigError, match="model.repa.block=5: the generation tower has blocks 0-2"):
        _module(minilm, block=5)


@pytest.mark.slow  # a 2-step fit through the CLI
def test_fit_with_repa_logs_its_loss(tmp_path):
    from mos_lightning.cli import cli_main

    rows = cli_main(["fit", "--config", str(ROOT / "experiments" / "router_inputs.yaml"), "--config",
                     str(ROOT / "tests" / "tiny.yaml"), "--arm", "prompt", "--model.repa=mos_lightning.alignment.Repa",
                     "--model.repa.init_args.block=1", f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert rows[0]["steps"] == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "router_inputs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert "train/repa" in events.Tags()["scalars"]
