"""Eq. 3-4 against an independent float64 reference written with plain loops."""
import itertools

import numpy as np
import pytest
import torch

from mos_lightning.errors import ConfigError
from mos_lightning.model.fusion import MoSFusion
from mos_lightning.model.router import aggregate, routing_weights, select_top_k
from mos_lightning.types import TowerGeometry, TowerStates

B, L, M, N, D = 2, 5, 7, 4, 6


def reference_weights(logits):
    w = np.exp(logits - logits.max(axis=2, keepdims=True))  # axis 2 is m
    return w / w.sum(axis=2, keepdims=True)


def reference_top_k(weights, k):
    sel = np.zeros(weights.shape, dtype=bool)
    for b, tok, j in itertools.product(*map(range, (weights.shape[0], weights.shape[1], weights.shape[3]))):
        sel[b, tok, np.argsort(-weights[b, tok, :, j])[:k], j] = True
    return sel


def reference_aggregate(hidden, weights, sel):
    out = np.zeros((hidden.shape[0], weights.shape[3], hidden.shape[2], hidden.shape[3]))
    for b, j, tok in itertools.product(range(hidden.shape[0]), range(weights.shape[3]), range(hidden.shape[2])):
        for i in range(hidden.shape[1]):
            if sel[b, tok, i, j]:
                out[b, j, tok] += weights[b, tok, i, j] * hidden[b, i, tok]
    return out


def test_softmax_is_over_understanding_layers(rng):
    logits = torch.randn(B, L, M, N, generator=rng, dtype=torch.float64) * 3
    got = routing_weights(logits).double().numpy()
    np.testing.assert_allclose(got, reference_weights(logits.numpy()), rtol=1e-5)
    np.testing.assert_allclose(got.sum(axis=2), 1.0, rtol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_greedy_top_k_set_and_eq4(rng, k):
    weights = routing_weights(torch.randn(B, L, M, N, generator=rng, dtype=torch.float64))
    hidden = torch.randn(B, M, L, D, generator=rng, dtype=torch.float64)
    sel = select_top_k(weights, k, epsilon=0.0)
    ref_sel = reference_top_k(weights.numpy(), k)
    assert (sel.numpy() == ref_sel).all()
    got = aggregate(hidden, weights.double(), sel).numpy()
    np.testing.assert_allclose(got, reference_aggregate(hidden.numpy(), weights.numpy(), ref_sel), rtol=1e-10)


def test_eq4_keeps_eq3_weights_unless_renormalised(rng):
    weights = routing_weights(torch.randn(B, L, M, N, generator=rng))
    sel = select_top_k(weights, 2, 0.0)
    ones = torch.ones(B, M, L, 1)  # S_i = 1 exposes the weight sum over the selected set
    paper = aggregate(ones, weights, sel)[..., 0]  # (B, n, L)
    assert (paper < 1 - 1e-4).any(), "Eq. 4 must not re-normalise over the k layers"
    np.testing.assert_allclose(aggregate(ones, weights, sel, renormalize=True).numpy(), 1.0, rtol=1e-5)


def test_epsilon_one_explores_uniformly(rng):
    weights = routing_weights(torch.randn(512, L, M, N, generator=rng))  # 10k decisions: 0.04 is ~9 sigma
    sel = select_top_k(weights, 2, epsilon=1.0, generator=rng)
    assert (sel.sum(dim=2) == 2).all()
    greedy = select_top_k(weights, 2, 0.0)
    same = (sel == greedy).all(dim=2).float().mean().item()
    assert same < 0.2  # a random pair matches the greedy pair with probability 1/21
    freq = sel.float().mean(dim=(0, 1, 3))  # how often each of the m layers is picked
    np.testing.assert_allclose(freq.numpy(), 2 / M, atol=0.04)


def test_epsilon_fraction(rng):
    weights = routing_weights(torch.randn(256, L, M, N, generator=rng))
    eps = 0.3
    differs = (select_top_k(weights, 2, eps, rng) != select_top_k(weights, 2, 0.0)).any(dim=2).float().mean()
    assert abs(differs.item() - eps * 20 / 21) < 0.03


def _states(rng, b=B, m=M, length=L, d=D):
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, -2:] = False
    return TowerStates(hidden=torch.randn(b, m, length, d, generator=rng), mask=mask)


def test_fusion_eval_mode_is_greedy_and_matches_reference(rng):
    geometry = TowerGeometry(M, D, N, 16)
    fusion = MoSFusion(geometry, top_k=2, epsilon=1.0, router_width=32, router_heads=4)
    states, latent, t = _states(rng), torch.randn(B, 9, 16, generator=rng), torch.rand(B, generator=rng)
    fusion.eval()
    out = fusion(states, latent, t)
    w = out.routing.weights.detach().double().numpy()
    ref_sel = reference_top_k(w, 2)
    assert (out.routing.selected.numpy() == ref_sel).all(), "eval must use eps = 0"
    mixed = reference_aggregate(states.hidden.double().numpy(), w, ref_sel)
    proj = fusion.proj.weight.detach().double().numpy()
    ref = np.einsum("bnld,nde->bnle", mixed, proj) + fusion.proj.bias.detach().double().numpy()[None, :, None]
    np.testing.assert_allclose(out.context.detach().double().numpy(), ref, rtol=1e-4, atol=1e-5)
    fusion.train()
    assert (fusion(states, latent, t).routing.selected.numpy() != ref_sel).any(), "training explores with eps = 1"


@pytest.mark.parametrize("kwargs, setting", [({"top_k": 0}, "top_k"), ({"top_k": M + 1}, "top_k"),
                                             ({"epsilon": -0.1}, "epsilon"), ({"epsilon": 1.5}, "epsilon"),
                                             ({"inputs": ["prompt", "noise"]}, "inputs"),
                                             ({"inputs": ["latent"]}, "inputs")])
def test_bad_router_settings(kwargs, setting):
    with pytest.raises(ConfigError, match=setting):
        MoSFusion(TowerGeometry(M, D, N, 16), **kwargs)
