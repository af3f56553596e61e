"""Rectified flow (Eq. 1), timestep samplers, the Euler sampler, CFG and sampler determinism."""
import math

import numpy as np
import pytest
import torch

from mos_lightning.errors import ConfigError
from mos_lightning.flow import (
    LogitNormal,
    ModeSampling,
    flow_loss,
    interpolate,
    shift_timesteps,
    velocity_from_data,
    velocity_target,
)
from mos_lightning.lit import warmup_cosine
from mos_lightning.sampling import classifier_free, euler, timestep_schedule


def test_interpolation_and_target(rng):
    z0, z1 = torch.randn(4, 3, 8, 8, generator=rng), torch.randn(4, 3, 8, 8, generator=rng)
    t = torch.rand(4, generator=rng)
    zt = interpolate(z0, z1, t)
    for b in range(4):
        torch.testing.assert_close(zt[b], (1 - t[b]) * z0[b] + t[b] * z1[b])
    torch.testing.assert_close(velocity_target(z0, z1), z1 - z0)
    # dz_t/dt is the target: a finite difference of the interpolation agrees
    h = 1e-3
    torch.testing.assert_close((interpolate(z0, z1, t + h) - zt) / h, z1 - z0, rtol=1e-2, atol=1e-2)
    pred = torch.randn_like(z0)
    np.testing.assert_allclose(flow_loss(pred, z0).numpy(), ((pred - z0) ** 2).mean(dim=(1, 2, 3)).numpy(), rtol=1e-6)


def test_logit_normal_distribution(rng):
    t = LogitNormal()(200_000, rng)
    assert 0 < t.min() and t.max() < 1
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item()) < 0.02 and abs(logit.std().item() - 1) < 0.02


def test_mode_sampling_matches_sd3_density(rng):
    scale = 0.8
    t = ModeSampling(scale=scale, shift=1.0)(200_000, rng)
    u = torch.linspace(0, 1, 10001, dtype=torch.float64)
    f = 1 - u - scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)  # f is decreasing; P(t <= f(u)) = 1 - u
    for q in (0.1, 0.5, 0.9):
        expected = 1 - q
        threshold = f[int(q * 10000)].item()
        assert abs((t <= threshold).float().mean().item() - expected) < 0.01


def test_shift_and_schedule():
    t = torch.linspace(0, 1, 11)
    torch.testing.assert_close(shift_timesteps(t, 1.0), t)
    shifted = shift_timesteps(t, 3.0)
    assert (shifted >= t - 1e-7).all() and shifted[0] == 0 and shifted[-1] == 1
    ts = timestep_schedule(8, shift=3.0)
    assert ts[0] == 1 and ts[-1] == 0 and (ts[1:] < ts[:-1]).all()


def test_euler_integrates_exactly_for_a_straight_path(rng):
    z0 = torch.randn(2, 3, 4, 4, generator=rng)
    z1 = torch.randn(2, 3, 4, 4, generator=rng)
    # the optimal rectified-flow velocity for a single pair is constant: Euler is exact
    out = euler(lambda z, t: z1 - z0, z1, steps=7, shift=2.0)
    torch.testing.assert_close(out, z0)


def test_classifier_free_guidance_formula(rng):
    vc, vu = torch.randn(3, generator=rng), torch.randn(3, generator=rng)
    guided = classifier_free(lambda z, t: vc, lambda z, t: vu, 4.5)
    torch.testing.assert_close(guided(None, None), vu + 4.5 * (vc - vu))


def test_bad_sampler_settings():
    with pytest.raises(ConfigError, match="shift"):
        LogitNormal(shift=0.0)
    with pytest.raises(ConfigError, match="scale"):
        ModeSampling(scale=5.0)


def test_warmup_cosine_schedule():
    f = warmup_cosine(10, 110, 0.15)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.15 + 0.85 * 0.5)
    assert f(110) == pytest.approx(0.15) and f(500) == pytest.approx(0.15)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_sampler_is_deterministic_given_seed(minilm):
    from mos_lightning.lit import MoSModule
    from mos_lightning.model.generation import GenerationTower

    module = MoSModule(understanding=minilm, generation=GenerationTower(width=32, depth=2, heads=2, patch_size=4))
    torch.nn.init.normal_(module.model.generation.head.weight, std=0.5)
    prompts = ["a red circle", "two blue squares"]
    a = module.generate(prompts, (16, 16), seed=3, steps=3, cfg_scale=2.0)
    b = module.generate(prompts, (16, 16), seed=3, steps=3, cfg_scale=2.0)
    c = module.generate(prompts, (16, 16), seed=4, steps=3, cfg_scale=2.0)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert a.shape == (2, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    routings = []
    module.generate(prompts[:1], (16, 16), seed=3, steps=3, routings=routings)
    assert len(routings) == 3 and routings[0].weights.shape[-2:] == (7, 2)


@pytest.mark.parametrize("precision, autocast", [("bf16-mixed", True), ("32-true", False)])
def test_sampling_under_a_trainer_uses_its_precision(minilm, precision, autocast):
    """Callbacks sample as validation runs (no grad, the trainer's autocast); without a trainer, no autocast."""
    import lightning as L

    from mos_lightning.lit import MoSModule
    from mos_lightning.model.generation import GenerationTower

    module = MoSModule(understanding=minilm, generation=GenerationTower(width=32, depth=1, heads=2, patch_size=4))
    seen = []
    module.model.generation.register_forward_hook(
        lambda *_: seen.append((torch.is_autocast_enabled("cpu"), torch.is_grad_enabled())))
    module.generate(["a red circle"], (16, 16), steps=1, cfg_scale=1.0)
    assert seen == [(False, False)]
    trainer = L.Trainer(accelerator="cpu", precision=precision, logger=False, enable_checkpointing=False)
    trainer.strategy.connect(module)
    module.trainer = trainer
    seen.clear()
    module.generate(["a red circle", "two blue squares"], (16, 16), steps=2, cfg_scale=1.0)
    assert seen == [(autocast, False)] * 2


def test_velocity_from_a_data_prediction(rng):
    """The true z0 gives back the true velocity z1 - z0 (t >= t_min); below t_min the division uses t_min."""
    z0, z1 = (torch.randn(5, 3, 8, 8, generator=rng, dtype=torch.float64) for _ in range(2))
    t = 0.05 + 0.95 * torch.rand(5, generator=rng, dtype=torch.float64)
    torch.testing.assert_close(velocity_from_data(interpolate(z0, z1, t), z0, t), z1 - z0)
    small = torch.full((5,), 0.01, dtype=torch.float64)
    zt = interpolate(z0, z1, small)
    torch.testing.assert_close(velocity_from_data(zt, z0, small), (zt - z0) / 0.05)


def test_data_prediction_setting(minilm, rng):
    from mos_lightning.lit import MoSModule
    from mos_lightning.model.generation import GenerationTower

    with pytest.raises(ConfigError, match="model.prediction"):
        MoSModule(understanding=minilm, generation=GenerationTower(width=32, depth=1, heads=2), prediction="noise")
    module = MoSModule(understanding=minilm, generation=GenerationTower(width=32, depth=1, heads=2), prediction="data")
    module.eval()  # eps = 0: both calls route the same way
    torch.nn.init.normal_(module.model.generation.head.weight, std=0.5)  # not the zero-initialised head
    z = torch.randn(2, 3, 8, 8, generator=rng)
    t = torch.tensor([0.3, 0.7])
    states = module.model.states(["a red circle", "a blue square"])
    velocity, _ = module.model(z, t, states)
    tower_output = module.model.generation(z, t, module.model.fusion(states, module.model.generation.patchify(z), t))
    torch.testing.assert_close(velocity, (z - tower_output) / t.view(-1, 1, 1, 1))
