"""The rival fusion strategies and router variants, each against an independent path."""
import pytest
import torch

from mos_lightning.errors import ConfigError
from mos_lightning.model.fusion import (
    CrossAttentionFusion,
    HandCraftedFusion,
    MoSFusion,
    SampleWiseMoSFusion,
    SelfAttentionFusion,
)
from mos_lightning.model.fusion.hand_crafted import evenly_spaced
from mos_lightning.model.generation import GenerationTower
from mos_lightning.model.router import aggregate
from mos_lightning.types import Routing, TowerGeometry, TowerStates

M, N, DU, DG = 7, 4, 24, 32


def _states(rng, b=3, length=6):
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[1, 4:] = False
    return TowerStates(hidden=torch.randn(b, M, length, DU, generator=rng), mask=mask)


def _tower():
    tower = GenerationTower(width=DG, depth=N, heads=2, patch_size=4, channels=3)
    torch.nn.init.normal_(tower.head.weight, std=0.1)
    return tower


def test_evenly_spaced_layers():
    assert evenly_spaced(7, 4) == [0, 2, 4, 6]
    assert evenly_spaced(7, 7) == list(range(7))
    assert evenly_spaced(25, 3) == [0, 12, 24]
    assert evenly_spaced(5, 1) == [4]


def test_hand_crafted_equals_mos_driven_by_a_fixed_one_hot_routing(rng):
    geometry = TowerGeometry(M, DU, N, DG)
    hand, mos = HandCraftedFusion(geometry, layers=[6, 0, 3, 3]), MoSFusion(geometry).eval()
    mos.proj.load_state_dict(hand.proj.state_dict())
    states, z, t = _states(rng), torch.randn(3, 3, 16, 16, generator=rng), torch.rand(3, generator=rng)
    one_hot = torch.zeros(3, 6, M, N)
    one_hot[..., [6, 0, 3, 3], range(N)] = 1.0
    mos.route = lambda s, latent, t: Routing(one_hot, one_hot, one_hot.bool(), s.mask)  # a fixed router
    tower = _tower()
    tokens = tower.patchify(z)
    via_mos, via_hand = mos(states, tokens, t), hand(states, tokens, t)
    torch.testing.assert_close(via_hand.context, via_mos.context)
    expected = aggregate(states.hidden, one_hot, one_hot.bool())  # Eq. 4 with one-hot weights
    torch.testing.assert_close(via_hand.context, hand.proj(expected))
    torch.testing.assert_close(tower(z, t, via_hand, tokens), tower(z, t, via_mos, tokens))


def test_cross_attention_with_zero_output_is_the_unconditional_tower(rng):
    fusion = CrossAttentionFusion(TowerGeometry(M, DU, N, DG))
    for layer in fusion.cross:
        torch.nn.init.zeros_(layer.out.weight)
        torch.nn.init.zeros_(layer.out.bias)
    tower, states = _tower(), _states(rng)
    z, t = torch.randn(3, 3, 16, 16, generator=rng), torch.rand(3, generator=rng)
    conditioning = fusion(states, tower.patchify(z), t)
    torch.testing.assert_close(tower(z, t, conditioning), tower(z, t, None))
    torch.nn.init.normal_(fusion.cross[0].out.weight)
    assert not torch.allclose(tower(z, t, fusion(states, tower.patchify(z), t)), tower(z, t, None))


def test_cross_attention_reads_only_its_layer(rng):
    fusion = CrossAttentionFusion(TowerGeometry(M, DU, N, DG), layer=2)
    tower, states = _tower(), _states(rng)
    for layer in fusion.cross:
        torch.nn.init.normal_(layer.out.weight, std=0.1)
    z, t = torch.randn(3, 3, 16, 16, generator=rng), torch.rand(3, generator=rng)
    before = tower(z, t, fusion(states, tower.patchify(z), t))
    states.hidden[:, [0, 1, 3, 4, 5, 6]] = torch.randn_like(states.hidden[:, [0, 1, 3, 4, 5, 6]])
    torch.testing.assert_close(tower(z, t, fusion(states, tower.patchify(z), t)), before)


def test_self_attention_stream_is_carried_and_padding_ignored(rng):
    fusion, tower, states = SelfAttentionFusion(TowerGeometry(M, DU, N, DG)), _tower(), _states(rng)
    z, t = torch.randn(3, 3, 16, 16, generator=rng), torch.rand(3, generator=rng)
    out = tower(z, t, fusion(states, tower.patchify(z), t))
    assert out.shape == z.shape
    states.hidden[1, :, 4:] = torch.randn_like(states.hidden[1, :, 4:])  # only padded positions change
    torch.testing.assert_close(tower(z, t, fusion(states, tower.patchify(z), t)), out)
    out.square().mean().backward()
    assert fusion.proj.weight.grad.abs().sum() > 0


def test_sample_wise_router_shares_one_matrix(rng):
    geometry = TowerGeometry(M, DU, N, DG)
    states, latent, t = _states(rng), torch.randn(3, 16, DG, generator=rng), torch.rand(3, generator=rng)
    logits = SampleWiseMoSFusion(geometry).eval().route(states, latent, t).logits
    assert torch.equal(logits, logits[:, :1].expand_as(logits))
    token_wise = MoSFusion(geometry).eval().route(states, latent, t).logits
    assert not torch.allclose(token_wise, token_wise[:, :1].expand_as(token_wise))


@pytest.mark.parametrize("fusion", [MoSFusion, SampleWiseMoSFusion], ids=lambda f: f.__name__)
def test_router_ignores_padded_prompt_tokens(rng, fusion):
    """The router's blocks never attend to padding: changing padded positions changes no real token's logits."""
    router = fusion(TowerGeometry(M, DU, N, DG)).eval().router
    states, latent, t = _states(rng), torch.randn(3, 16, DG, generator=rng), torch.rand(3, generator=rng)
    changed = states.hidden.clone()
    changed[1, :, 4:] = 10 * torch.randn(M, 2, DU, generator=rng)
    before, after = router(states, latent, t), router(TowerStates(hidden=changed, mask=states.mask), latent, t)
    keep = states.mask[:, :, None, None].expand_as(before)
    torch.testing.assert_close(after[keep], before[keep])
    changed[1, :, :4] = torch.randn(M, 4, DU, generator=rng)  # real tokens do matter
    assert not torch.allclose(router(TowerStates(hidden=changed, mask=states.mask), latent, t)[1], before[1])


def test_router_norm_shared_or_per_modality():
    geometry = TowerGeometry(M, DU, N, DG)
    shared = MoSFusion(geometry, modality_norms=False).router.norms
    assert shared["prompt"] is shared["latent"] is shared["timestep"]
    per = MoSFusion(geometry).router.norms
    assert len({id(per[k]) for k in per}) == 3


@pytest.mark.parametrize("build, setting", [
    (lambda g: HandCraftedFusion(g, layers=[0, 1, 2, 7]), "fusion.layers"),
    (lambda g: HandCraftedFusion(g, layers=[0, 1]), "fusion.layers"),
    (lambda g: CrossAttentionFusion(g, layer=7), "fusion.layer=7"),
    (lambda g: SelfAttentionFusion(g, layer=-8), "fusion.layer=-8"),
    (lambda g: MoSFusion(g, top_k=8), "fusion.top_k=8"),
])
def test_bad_strategy_settings(build, setting):
    with pytest.raises(ConfigError, match=setting):
        build(TowerGeometry(M, DU, N, DG))


def test_tower_keys_values_are_its_own_attention_projections(minilm):
    from mos_lightning.model.understanding import UnderstandingTower

    tower = UnderstandingTower(dtype="float32")
    tower.capture_keys_values = True
    states = tower(["a red circle to the left of a blue square", "two green crosses"])
    layers = tower.model.encoder.layer
    assert states.keys_values.shape[:3] == (2, len(layers), 2)
    for i, layer in enumerate(layers):  # layer i reads hidden state i
        attention = layer.attention.self
        keys, values = states.keys_values[:, i].unbind(1)
        torch.testing.assert_close(keys, attention.key(states.hidden[:, i]), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(values, attention.value(states.hidden[:, i]), rtol=1e-4, atol=1e-4)


def test_decoder_keys_values(tiny_llama_path):
    from mos_lightning.model.understanding import UnderstandingTower

    tower = UnderstandingTower(tiny_llama_path, dtype="float32")
    tower.capture_keys_values = True
    states = tower(["a red circle"])
    layer = tower.model.layers[1]
    expected = layer.self_attn.k_proj(layer.input_layernorm(states.hidden[:, 1]))
    torch.testing.assert_close(states.keys_values[:, 1, 0], expected, rtol=1e-4, atol=1e-4)


def _mot_geometry(layers=4, heads=2, head_dim=16, gen_heads=2, gen_width=32):
    return TowerGeometry(layers + 1, 48, layers, gen_width, heads, head_dim, gen_heads)


def test_mot_block_j_reads_tower_layer_j(rng):
    from mos_lightning.model.fusion import MoTFusion

    geometry = _mot_geometry()
    kv = torch.randn(3, 4, 2, 6, 32, generator=rng)
    states = TowerStates(torch.randn(3, 5, 6, 48, generator=rng), torch.ones(3, 6, dtype=torch.bool), kv)
    conditioning = MoTFusion(geometry)(states, None, None)
    for j in range(4):
        k, v = conditioning.block_inputs(j)["context_kv"]
        torch.testing.assert_close(k.transpose(1, 2).flatten(2), kv[:, j, 0])  # (B, L, H d) again
        torch.testing.assert_close(v.transpose(1, 2).flatten(2), kv[:, j, 1])


@pytest.mark.parametrize("geometry, message", [
    (_mot_geometry(layers=4), None),
    (TowerGeometry(5, 48, 3, 32, 2, 16, 2), "one understanding layer per generation block"),
    (_mot_geometry(gen_heads=4), "same head geometry"),
    (_mot_geometry(head_dim=8), "same head geometry"),
])
def test_mot_needs_symmetric_towers(geometry, message):
    from mos_lightning.model.fusion import MoTFusion

    if message is None:
        MoTFusion(geometry)
        return
    with pytest.raises(ConfigError, match=message):
        MoTFusion(geometry)


def test_key_value_routing_against_reference(rng):
    from mos_lightning.model.fusion import KeyValueMoSFusion
    from mos_lightning.model.router import select_top_k

    geometry = _mot_geometry(layers=4, gen_width=32)
    fusion = KeyValueMoSFusion(geometry, top_k=2).eval()
    kv = torch.randn(3, 4, 2, 6, 32, generator=rng)
    states = TowerStates(torch.randn(3, 5, 6, 48, generator=rng), torch.ones(3, 6, dtype=torch.bool), kv)
    out = fusion(states, torch.randn(3, 9, 32, generator=rng), torch.rand(3, generator=rng))
    w = out.routing.weights.detach()
    assert w.shape[-2:] == (4, 4)  # routes among the 4 layers that have K/V
    sel = select_top_k(w, 2, 0.0)
    b, tok, j = 1, 3, 2  # one (sample, token, block), by hand
    mixed = sum(w[b, tok, i, j] * torch.cat([kv[b, i, 0, tok], kv[b, i, 1, tok]])
                for i in range(4) if sel[b, tok, i, j])
    expected = mixed @ fusion.proj.weight[j] + fusion.proj.bias[j]  # (2 * D_g)
    k, v = out.block_inputs(j)["context_kv"]
    got = torch.cat([k[b, :, tok].flatten(), v[b, :, tok].flatten()])
    torch.testing.assert_close(got, expected.detach(), rtol=1e-4, atol=1e-5)
