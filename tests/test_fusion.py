"""The rival fusion strategies and router variants, each against an independent path."""
import pytest
import torch

from mos_lightning.errors import ConfigError
from mos_lightning.model.fusion import (CrossAttentionFusion, HandCraftedFusion, MoSFusion, SampleWiseMoSFusion,
                                        SelfAttentionFusion)
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
    tower = GenerationTower(width=DG, depth=N, heads=2, patch_size=4)
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
