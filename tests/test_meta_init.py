"""model.parallelism.meta_init: the trainable modules built on the meta device and materialised by
parallel.materialize match an eager build's initialisation, module by module; the frozen tower keeps its
loaded weights. (2-process FSDP2 with meta init: tests/test_fsdp.py.)"""
import os

import pytest
import torch

import mos_lightning.model.fusion as fusions
from mos_lightning.lit import MoSModule
from mos_lightning.model.generation import GenerationTower
from mos_lightning.model.understanding import UnderstandingTower
from mos_lightning.parallel import Parallelism, materialize

FUSIONS = [fusions.MoSFusion, fusions.SampleWiseMoSFusion, fusions.KeyValueMoSFusion, fusions.HandCraftedFusion,
           fusions.CrossAttentionFusion, fusions.SelfAttentionFusion]


@pytest.fixture(scope="module")
def tower():
    return UnderstandingTower()


def _meta_module(tower, fusion) -> MoSModule:
    with torch.device("meta"):
        generation = GenerationTower(width=64, depth=3, heads=2)
    return MoSModule(understanding=tower, generation=generation, fusion=fusion,
                     parallelism=Parallelism(meta_init=True))


def _same_spread(p: torch.Tensor, q: torch.Tensor, alpha: float = 1e-6) -> bool:
    """Two-sided F-test of equal variance: a fixed bound on the std ratio flaked on the router head's 18-21
    biases (a ratio of 0.48 is a 2-sigma draw there), while at 4096 entries a 10 % error is still caught."""
    from scipy.stats import f

    dof = p.numel() - 1
    ratio = (p.double().var() / q.double().var()).item()
    return f.ppf(alpha / 2, dof, dof) < ratio < f.ppf(1 - alpha / 2, dof, dof)


@pytest.mark.parametrize("fusion", FUSIONS, ids=lambda f: f.__name__)
def test_materialized_init_matches_eager_init(tower, fusion):
    loaded = {n: p.detach().clone() for n, p in tower.named_parameters()}
    module = _meta_module(tower, fusion)
    assert all(p.is_meta for p in module.model.generation.parameters()) and module.model.null_context.is_meta
    module.configure_model()
    # materialize draws inside fork_rng (the global stream is left as it was), so the eager model must start
    # from another state for "drawn afresh" to be tested
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    eager = MoSModule(understanding=tower, generation=GenerationTower(width=64, depth=3, heads=2), fusion=fusion)
    got, want = dict(module.model.named_parameters()), dict(eager.model.named_parameters())
    assert list(got) == list(want)
    for name, p in got.items():
        q = want[name]
        assert not p.is_meta and p.shape == q.shape and p.requires_grad == q.requires_grad, name
        if name.startswith("understanding."):
            assert torch.equal(p, loaded[name.removeprefix("understanding.")]), name  # never re-initialised
        elif q.detach().std() == 0 or q.numel() == 1:  # zeros (the head, biases) and ones (norm weights)
            assert torch.equal(p, q), name
        else:  # drawn afresh from the same distribution
            assert not torch.equal(p, q), name
            assert _same_spread(p.detach(), q.detach()), f"{name}: std {p.std():.4g} against eager {q.std():.4g}"
            assert p.detach().abs().max() <= 6 * q.detach().std() + q.detach().abs().max(), name
    for (name, b), (_, c) in zip(module.model.named_buffers(), eager.model.named_buffers()):
        assert torch.equal(b, c), name  # fixed buffers (hand-crafted routing's layer indices) refilled


def test_materialized_model_trains(tower):
    module = _meta_module(tower, fusions.MoSFusion)
    module.configure_model()
    model = module.model
    z, t = torch.randn(3, 3, 32, 32), torch.rand(3)
    velocity, _ = model(z, t, model.states(["a red circle", "two blue squares", "a green triangle"]))
    assert velocity.shape == z.shape and torch.equal(velocity, torch.zeros_like(velocity))  # zero head, as eager
    (velocity - torch.randn_like(z)).pow(2).mean().backward()
    assert model.generation.head.weight.grad.abs().sum() > 0


def test_a_module_without_reset_parameters_is_a_clear_error():
    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones(4))

    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), Scale())
    with pytest.raises(TypeError, match="Scale built on the meta device without reset_parameters"):
        materialize(model, "cpu")
