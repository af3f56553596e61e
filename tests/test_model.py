"""Asymmetric towers, gradient flow, frozen understanding tower, decoder towers, bad settings."""
from functools import partial

import pytest
import torch

from mos_lightning.errors import ConfigError
from mos_lightning.flow import flow_loss, interpolate, velocity_target
from mos_lightning.model.fusion import (
    CrossAttentionFusion,
    KeyValueMoSFusion,
    MoSFusion,
    SampleWiseMoSFusion,
    SelfAttentionFusion,
)
from mos_lightning.model.generation import GenerationTower
from mos_lightning.model.text_to_image import TextToImage
from mos_lightning.model.understanding import UnderstandingTower

CAPTIONS = ["two red circles to the left of a blue square", "a green triangle"]


def _loss(model, rng, size=(16, 24)):
    z0 = torch.rand(2, 3, *size, generator=rng) * 2 - 1
    z1 = torch.randn(2, 3, *size, generator=rng)
    t = torch.rand(2, generator=rng)
    v, conditioning = model(interpolate(z0, z1, t), t, model.states(CAPTIONS))
    return flow_loss(v, velocity_target(z0, z1)).mean(), conditioning


def _perturb_head(model):
    """The output head starts at zero (DiT init); give it weights so gradients reach the blocks."""
    torch.nn.init.normal_(model.generation.head.weight, std=0.02)


def test_asymmetric_towers_and_gradients(minilm, rng):
    generation = GenerationTower(width=64, depth=3, heads=4, patch_size=4)
    model = TextToImage(minilm, generation, MoSFusion)
    assert model.geometry.understanding_layers == 7 and model.geometry.generation_layers == 3  # m != n
    _perturb_head(model)
    loss, conditioning = _loss(model, rng)
    assert conditioning.context.shape[:2] == (2, 3) and conditioning.context.shape[-1] == 64
    assert conditioning.routing.logits.shape[-2:] == (7, 3)
    loss.backward()
    router_grads = [p.grad for p in model.fusion.router.parameters()]
    assert all(g is not None for g in router_grads) and sum(g.abs().sum() for g in router_grads) > 0
    assert model.fusion.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in generation.blocks.parameters())
    assert all(not p.requires_grad and p.grad is None for p in minilm.parameters())


def test_understanding_tower_is_frozen_in_train_mode(minilm):
    model = TextToImage(minilm, GenerationTower(width=32, depth=2, heads=2), MoSFusion)
    model.train()
    assert not minilm.model.training
    a, b = minilm.encode(CAPTIONS), minilm.encode(CAPTIONS)
    torch.testing.assert_close(a.hidden, b.hidden)  # no dropout


def test_minilm_embedded_states(minilm):
    states = minilm(CAPTIONS)
    assert states.hidden.shape[:2] == (2, 7) and states.hidden.shape[-1] == 384
    assert states.mask[0].all() and not states.mask[1].all()


def test_memo_equals_direct_encoding(rng, monkeypatch):
    """A memo hit is what the caption's first encoding gave, bit for bit. Here that first encoding is this very
    batch, so it equals encoding the batch directly; another batch would pad the caption differently, which
    changes its states slightly (bf16 most of all), so the reference is the same batch, not the caption alone."""
    tag = int(torch.randint(10**6, (1,), generator=rng))
    captions = [f"{c} {tag}" for c in CAPTIONS]  # in no earlier test's memo: the memo is shared per process
    tower = UnderstandingTower(dtype="float32", memo_size=2)
    direct = tower.encode(captions)
    keep = direct.mask[:, None, :, None]
    for call in range(2):  # first call fills the memo, the second reads it without the tower
        if call:
            monkeypatch.setattr(tower, "encode", lambda c: pytest.fail("the tower ran on a memo hit"))
        memo = tower(captions)
        assert torch.equal(memo.mask, direct.mask)
        assert torch.equal(memo.hidden * keep, direct.hidden * keep)
    monkeypatch.undo()
    tower(["a blue circle"])
    assert len(tower.store.memo) == 2  # bounded


def test_decoder_tower_through_the_same_path(tiny_llama_path, rng):
    tower = UnderstandingTower(tiny_llama_path, dtype="float32")
    assert tower.num_layers == 3 and tower.width == 48
    model = TextToImage(tower, GenerationTower(width=32, depth=5, heads=2, patch_size=8), MoSFusion)
    _perturb_head(model)
    loss, conditioning = _loss(model, rng)
    loss.backward()
    assert conditioning.routing.logits.shape[-2:] == (3, 5)
    assert model.fusion.proj.weight.grad.abs().sum() > 0


def test_timestep_embedding_switch(rng):
    off = GenerationTower(width=32, depth=1, heads=2)
    on = GenerationTower(width=32, depth=1, heads=2, timestep_embedding=True)
    assert off.timestep is None and on.timestep is not None
    assert on.extra_tokens(2, torch.rand(2, generator=rng)).shape == (2, 5, 32)


def test_bad_tower_paths(tmp_path):
    with pytest.raises(ConfigError, match="understanding.path.*does not exist"):
        UnderstandingTower(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="understanding.path.*not a transformers model"):
        UnderstandingTower(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="understanding.path"):
        UnderstandingTower(str(tmp_path))


def test_image_not_divisible_by_patch():
    with pytest.raises(ConfigError, match="patch_size"):
        GenerationTower(width=32, depth=1, heads=2, patch_size=4, channels=3).patchify(torch.randn(1, 3, 30, 32))


def test_truncated_tower_equals_the_first_layers(minilm):
    small = UnderstandingTower(dtype="float32", num_layers=3)
    assert small.num_layers == 4
    full, part = minilm(CAPTIONS), small(CAPTIONS)
    keep = full.mask[:, None, :, None]
    torch.testing.assert_close(part.hidden * keep, full.hidden[:, :4] * keep, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="num_layers=9"):
        UnderstandingTower(num_layers=9)


def _perturbed_pair(minilm, fusion, rng):
    """An eager model and a compiled copy with the same weights (norms start at one and the head at zero:
    perturbed so every weight matters)."""
    torch.compiler.reset()  # a fresh compile per test: the recompile limit counts across models
    torch.manual_seed(rng.initial_seed() % 2**31)
    eager = TextToImage(minilm, GenerationTower(width=32, depth=2, heads=2), fusion)
    compiled = TextToImage(minilm, GenerationTower(width=32, depth=2, heads=2), fusion)
    for p in eager.parameters():
        if p.requires_grad:
            p.data.add_(0.1 * torch.randn(p.shape, generator=rng))
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_regions()  # parameter names (and so checkpoints) do not change
    assert set(compiled.state_dict()) == set(eager.state_dict())
    regions = [*compiled.generation.blocks, *compiled.fusion.compiled_regions()]
    assert all(region._compiled_call_impl is not None for region in regions)
    return eager, compiled


def _assert_same_training_step(eager, compiled, rng, size):
    """Same data, t and eps-greedy draws: equal loss and equal gradients for every trainable weight."""
    seed = int(torch.randint(2**31, (1,), generator=rng))
    results = []
    for model in (eager, compiled):
        model.zero_grad()
        torch.manual_seed(seed)
        loss, _ = _loss(model, torch.Generator().manual_seed(seed), size)
        loss.backward()
        results.append((loss, [p.grad for p in model.parameters() if p.requires_grad]))
    (loss_e, grads_e), (loss_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert [g is None for g in grads_c] == [g is None for g in grads_e]
    grads = [(g_c, g_e) for g_c, g_e in zip(grads_c, grads_e) if g_e is not None]  # a path's unused weights have none
    used = [p for block in eager.generation.blocks for p in (block.q.weight, block.kv.weight, block.ffn.down.weight)]
    used += [p for region in eager.fusion.compiled_regions() for p in region.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in used)  # the compiled regions are compared
    for g_c, g_e in grads:
        torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # torch.compile
def test_compiled_blocks_equal_eager(minilm, rng):
    """compile_regions (regional torch.compile, dynamic shapes) computes the eager model's loss and gradients
    at two image sizes; and in eval under no_grad and bf16 autocast, as validation and sampling in fit run it."""
    eager, compiled = _perturbed_pair(minilm, MoSFusion, rng)
    for size in ((16, 16), (16, 24)):
        _assert_same_training_step(eager, compiled, rng, size)
    seed = int(torch.randint(2**31, (1,), generator=rng))
    losses = []
    for model in (eager.eval(), compiled.eval()):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(_loss(model, torch.Generator().manual_seed(seed))[0].float())
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=1e-3)  # bf16 rounding differs when fused


@pytest.mark.slow  # torch.compile
@pytest.mark.parametrize("fusion", [CrossAttentionFusion, SelfAttentionFusion, KeyValueMoSFusion, SampleWiseMoSFusion],
                         ids=lambda f: f.__name__)
def test_compiled_blocks_equal_eager_for_the_rival_paths(minilm, rng, fusion):
    """The block's other inputs under compile: a cross-attention sub-layer, a carried prompt stream, and
    ready keys/values (the path MoT takes too); and the sample-wise router's [CLS] path."""
    eager, compiled = _perturbed_pair(minilm, fusion, rng)
    try:
        _assert_same_training_step(eager, compiled, rng, (16, 24))
    finally:
        minilm.capture_keys_values = False  # the session's shared tower: K/V fusions switch capture on


@pytest.mark.slow  # torch.compile
def test_compiled_graphs_serve_every_batch_size_and_router_input(minilm, rng):
    """One compiled graph per mode, whatever comes later: a batch equal to the head dim (8) first, then another
    batch and image size; then a second model whose router sees other inputs (another arm of Table 1) reuses
    the router blocks' graph. Any recompile raises."""
    torch.compiler.reset()
    torch.manual_seed(rng.initial_seed() % 2**31)
    captions = ["a red circle and a blue square", "three green triangles", "a cross"] * 3

    def build(inputs):
        model = TextToImage(minilm, GenerationTower(width=32, depth=2, heads=4), partial(MoSFusion, inputs=inputs))
        model.compile_regions()
        return model.eval()

    def forward(model, batch, size):
        z, t = torch.randn(batch, 3, *size, generator=rng), torch.rand(batch, generator=rng)
        with torch.no_grad():
            return model(z, t, model.states(captions[:batch]))[0]

    model = build(["prompt"])
    forward(model, 8, (16, 16))
    with torch._dynamo.config.patch(error_on_recompile=True):
        forward(model, 3, (16, 24))
        forward(build(["prompt", "latent", "timestep"]), 5, (16, 16))


def test_towers_of_one_identity_share_their_memo(rng):
    """The arms of an ablation share the tower's memo: a second tower with the same identity finds the first's
    states (equal to encoding directly); a tower with other layers or another dtype does not."""
    caption = f"a red circle {int(torch.randint(10**6, (1,), generator=rng))}"  # not memoised by earlier tests
    first = UnderstandingTower(dtype="float32", memo_size=4)
    first([caption])
    second = UnderstandingTower(dtype="float32", memo_size=4)
    assert caption in second.store.memo
    direct, memo = second.encode([caption]), second([caption])
    assert torch.equal(memo.hidden, direct.hidden)  # alone both times: bit for bit
    for other in (UnderstandingTower(dtype="float32", memo_size=4, num_layers=3),
                  UnderstandingTower(dtype="bfloat16", memo_size=4)):
        assert caption not in other.store.memo
