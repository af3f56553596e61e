"""benchmarks/peer.py builds the kit's self-attention arm and diffusers' SD3 transformer as like for like."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import peer  # noqa: E402


@pytest.fixture(scope="module")
def built(minilm):
    torch.manual_seed(0)
    return peer.build(width=32, depth=2, heads=2, tower=minilm)


def test_same_geometry(built):
    models, _, _ = built
    config = models["diffusers"].config
    for name in ("kit", "kit_equal_flops"):
        gen = models[name].generation
        assert gen.width == config.num_attention_heads * config.attention_head_dim
        assert gen.depth == config.num_layers == len(models["diffusers"].transformer_blocks)
        assert (gen.heads, gen.patch_size) == (config.num_attention_heads, config.patch_size)


def test_parameters_and_flops_matched(built):
    models, ratios, flops = built
    n_sd3 = peer.trainable(models["diffusers"])
    assert abs(peer.trainable(models["kit"]) / n_sd3 - 1) <= peer.TOLERANCE
    assert abs(flops["kit_equal_flops"] / flops["diffusers"] - 1) <= peer.FLOP_TOLERANCE
    assert ratios["kit_equal_flops"] < ratios["kit"]  # equal FLOPs leave the single-stream kit fewer parameters


def test_same_output_shape_and_a_training_step_runs(built, minilm):
    models, _, _ = built
    x = peer.make_inputs(minilm, batch=2)
    for name, model in models.items():
        out = peer.output_fn(name)(model, x)
        assert out.shape == x["z"].shape, name
        out.float().square().mean().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name
        model.zero_grad(set_to_none=True)
        peer.step(model, peer.output_fn(name), x)  # the timed step itself, under the benchmark's autocast
        assert all(p.grad is None for p in model.parameters()), name
