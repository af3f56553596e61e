"""Router-pattern analysis (App. B.7) against float64 loops; the RouterFigures callback in a tiny fit."""
import itertools
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mos_lightning.analysis import figures as F
from mos_lightning.analysis import routing as R
from mos_lightning.analysis.trace import trace
from mos_lightning.callbacks.router_viz import RouterFigures
from mos_lightning.cli import cli_main
from mos_lightning.lit import MoSModule
from mos_lightning.model.generation import GenerationTower
from mos_lightning.model.router import routing_weights, select_top_k
from mos_lightning.types import Routing

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "tiny.yaml")
S, B, L, M, N, K = 4, 3, 7, 5, 4, 2


def random_routings(rng, steps=S, k=K) -> list[Routing]:
    """Fresh logits -> Eq. 3 softmax -> k layers picked at random (not greedily) per decision;
    random masks that are not prefixes, each prompt with at least one real token."""
    mask = torch.rand(B, L, generator=rng) < 0.5
    mask[torch.arange(B), torch.randint(L, (B,), generator=rng)] = True
    out = []
    for _ in range(steps):
        logits = torch.randn(B, L, M, N, generator=rng) * 2
        picks = torch.rand(B, L, M, N, generator=rng).argsort(dim=2)[:, :, :k]
        selected = torch.zeros(B, L, M, N, dtype=torch.bool).scatter(2, picks, True)
        out.append(Routing(logits, torch.softmax(logits, dim=2), selected, mask))
    return out


def arrays(r: Routing):
    return r.logits.double().numpy(), r.weights.double().numpy(), r.selected.numpy(), r.mask.numpy()


def real(mask, b):
    return [tok for tok in range(mask.shape[1]) if mask[b, tok]]


def ref_per_prompt(routings, value, sample):
    """Hand loop: value(arrays, b, tok, j) -> (m,)-vector or scalar, averaged over real tokens and
    generation layers per prompt, then prompt `sample` or the mean over prompts; one row per step."""
    rows = []
    for r in routings:
        a = arrays(r)
        per_prompt = []
        for b in range(B):
            total = sum(value(a, b, tok, j) for tok in real(a[3], b) for j in range(N))
            per_prompt.append(np.asarray(total, dtype=np.float64) / (len(real(a[3], b)) * N))
        rows.append(np.mean(per_prompt, axis=0) if sample is None else per_prompt[sample])
    return np.array(rows)


def ref_entropy(logits_column):
    top = max(logits_column)
    exps = [math.exp(x - top) for x in logits_column]
    total = sum(exps)
    return -sum((e / total) * math.log(e / total) for e in exps)


def ref_pair_map(routings, value, sample):
    """(m, n): value(arrays, b, tok, i, j) averaged over real tokens per prompt and step, then prompts, then steps."""
    steps = []
    for r in routings:
        a = arrays(r)
        per_prompt = np.zeros((B, M, N))
        for b, i, j in itertools.product(range(B), range(M), range(N)):
            tokens = real(a[3], b)
            per_prompt[b, i, j] = sum(value(a, b, tok, i, j) for tok in tokens) / len(tokens)
        steps.append(per_prompt.mean(0) if sample is None else per_prompt[sample])
    return np.mean(steps, axis=0)


ROUTED = lambda a, b, tok, j: np.array([a[1][b, tok, i, j] * a[2][b, tok, i, j] for i in range(M)])  # noqa: E731


@pytest.mark.parametrize("sample", [None, 1])
def test_step_contributions(rng, sample):
    routings = random_routings(rng)
    got = R.step_contributions(routings, sample)
    assert got.shape == (S, M)
    np.testing.assert_allclose(got.numpy(), ref_per_prompt(routings, ROUTED, sample), rtol=1e-5, atol=1e-7)


def test_token_routing_keeps_real_tokens_in_order(rng):
    routings = random_routings(rng)
    step, b = 2, 1
    _, w, sel, mask = arrays(routings[step])
    expected = [[sum(w[b, tok, i, j] * sel[b, tok, i, j] for j in range(N)) / N for i in range(M)]
                for tok in real(mask, b)]
    got = R.token_routing(routings, step, b)
    assert got.shape == (len(real(mask, b)), M)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("kind, value", [
    ("weights", lambda a, b, tok, i, j: a[1][b, tok, i, j]),
    ("routed", lambda a, b, tok, i, j: a[1][b, tok, i, j] * a[2][b, tok, i, j]),
    ("logits", lambda a, b, tok, i, j: a[0][b, tok, i, j]),
])
@pytest.mark.parametrize("sample", [None, 0])
def test_affinity(rng, kind, value, sample):
    routings = random_routings(rng)
    np.testing.assert_allclose(R.affinity(routings, sample, kind).numpy(), ref_pair_map(routings, value, sample),
                               rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="allowed"):
        R.affinity(routings, kind="probabilities")


@pytest.mark.parametrize("sample", [None, 2])
def test_entropy_and_sparsity_per_step(rng, sample):
    routings = random_routings(rng)
    entropy = ref_per_prompt(routings, lambda a, b, tok, j: ref_entropy(a[0][b, tok, :, j]), sample)
    mass = ref_per_prompt(routings, lambda a, b, tok, j: sum(ROUTED(a, b, tok, j)), sample)  # over the m layers
    np.testing.assert_allclose(R.routing_entropy(routings, sample).numpy(), entropy, rtol=1e-9)
    np.testing.assert_allclose(R.sparsity(routings, sample).numpy(), mass, rtol=1e-6)
    assert (R.routing_entropy(routings) <= math.log(M) + 1e-9).all()


def test_greedy_top_k_holds_at_least_k_over_m_of_the_mass(rng):
    logits = torch.randn(B, L, M, N, generator=rng) * 3
    weights = routing_weights(logits)
    routing = Routing(logits, weights, select_top_k(weights, K, 0.0), torch.ones(B, L, dtype=torch.bool))
    assert (R.sparsity([routing]) >= K / M - 1e-9).all()


@pytest.mark.parametrize("sample", [None, 1])
def test_selection_frequency(rng, sample):
    routings = random_routings(rng)
    got = R.selection_frequency(routings, sample)
    expected = ref_pair_map(routings, lambda a, b, tok, i, j: float(a[2][b, tok, i, j]), sample)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(got.sum(0).numpy(), K)  # every decision picks k layers
    np.testing.assert_allclose(R.layer_selection_frequency(routings, sample).numpy(), got.mean(1).numpy())


def test_arm_difference(rng):
    a, b = random_routings(rng), random_routings(rng)
    diff = R.arm_difference(a, b)
    np.testing.assert_allclose(diff["contribution"].numpy(),
                               ref_per_prompt(a, ROUTED, None) - ref_per_prompt(b, ROUTED, None), rtol=1e-5, atol=1e-7)
    freq = lambda x, b_, tok, i, j: float(x[2][b_, tok, i, j])  # noqa: E731
    np.testing.assert_allclose(diff["selection_frequency"].numpy(),
                               ref_pair_map(a, freq, None) - ref_pair_map(b, freq, None), atol=1e-12)
    with pytest.raises(ValueError, match="cannot compare"):
        R.arm_difference(a, b[:2])


def test_summary_scalars(rng):
    routings = random_routings(rng)
    scalars = R.summary_scalars(routings)
    entropy = ref_per_prompt(routings, lambda a, b, tok, j: ref_entropy(a[0][b, tok, :, j]), None)
    assert scalars["router/entropy"] == pytest.approx(entropy.mean())
    layers = [scalars[f"router/selection_freq/layer_{i}"] for i in range(M)]
    assert sum(layers) == pytest.approx(K) and len(scalars) == M + 2
    with pytest.raises(ValueError, match="only MoS"):
        R.summary_scalars([])


def test_figures_are_labelled(rng):
    routings = random_routings(rng)
    timesteps = torch.linspace(1, 0, S + 1)
    ax = F.contribution_figure(R.step_contributions(routings), timesteps).axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("denoising step (t)", "understanding layer i")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1.00", "0.75", "0.50", "0.25"]
    ax = F.layer_pair_figure(R.selection_frequency(routings), "f").axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("generation layer j", "understanding layer i")
    tokens = [[f"tok{tok}" for tok in real(routings[0].mask.numpy(), b)] for b in range(2)]
    fig = F.token_figure([R.token_routing(routings, 0, b) for b in range(2)], tokens, ["p0", "p1"])
    panels = [a for a in fig.axes if a.get_ylabel() == "token"]
    assert [[t.get_text() for t in a.get_yticklabels()] for a in panels] == tokens


def test_trajectory_strip_places_each_frame():
    frames = torch.rand(3, 2, 3, 8, 8)  # (S, B, C, H, W)
    strip = F.trajectory_strip(frames)
    assert strip.shape == (3, 2 * 9 + 1, 3 * 9 + 1)  # 1-pixel padding around every frame
    for s, b in itertools.product(range(3), range(2)):
        torch.testing.assert_close(strip[:, 1 + 9 * b: 9 + 9 * b, 1 + 9 * s: 9 + 9 * s], frames[s, b])


def test_trace_records_what_generate_does(minilm):
    module = MoSModule(understanding=minilm, generation=GenerationTower(width=32, depth=2, heads=2), sample_steps=3)
    long_prompt = " ".join(["a red circle and a blue square"] * 8)  # beyond the tower's max_length
    prompts = ["two purple circles", long_prompt]
    module.train()
    result = trace(module, prompts, (16, 16), seed=3)
    assert module.training, "trace must restore the training mode"
    routings = []
    images = module.generate(prompts, (16, 16), seed=3, routings=routings)
    assert len(result.routings) == 3 and result.frames.shape == (3, 2, 3, 16, 16)
    torch.testing.assert_close(result.frames[-1], (images.float() + 1) / 2)
    torch.testing.assert_close(result.routings[0].logits, routings[0].logits)
    assert [len(t) for t in result.tokens] == result.routings[0].mask.sum(1).tolist()
    assert result.tokens[0] == ["[CLS]", "two", "purple", "circles", "[SEP]"]
    assert len(result.tokens[1]) == minilm.max_length and result.tokens[1][-1] == "[SEP]"
    assert set(F.trace_figures(result)) == {"contribution", "tokens", "affinity", "selection_frequency", "entropy",
                                            "trajectory"}


def test_callback_skips_the_sanity_check():
    trainer = SimpleNamespace(sanity_checking=True, logger=SimpleNamespace(experiment=SimpleNamespace(add_figure=None)))
    RouterFigures().on_validation_epoch_end(trainer, pl_module=None)  # returns before touching the module


def fit_with_router_figures(tmp_path, experiment, arm):
    overlay = tmp_path / "router_figures.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"callbacks": [{
        "class_path": "mos_lightning.callbacks.router_viz.RouterFigures",
        "init_args": {"prompts": ["a red circle", "two blue squares"], "steps": 3}}]}}))
    cli_main(["fit", "--config", str(ROOT / "experiments" / experiment), "--config", TINY, "--config", str(overlay),
              "--arm", arm, f"--trainer.logger.init_args.save_dir={tmp_path}"])
    events = EventAccumulator(str(tmp_path / Path(experiment).stem / arm), size_guidance={"images": 0, "scalars": 0})
    return events.Reload().Tags()


@pytest.mark.slow  # a fit with the RouterFigures callback
def test_callback_logs_router_figures_and_scalars_in_a_tiny_fit(tmp_path):
    tags = fit_with_router_figures(tmp_path, "router_inputs.yaml", "prompt_latent_timestep")
    for name in ("contribution", "tokens", "affinity", "selection_frequency", "entropy", "trajectory"):
        assert f"router/{name}" in tags["images"], f"router/{name} missing from {tags['images']}"
    m = 7  # MiniLM: the embeddings output + 6 layers
    scalars = {f"router/selection_freq/layer_{i}" for i in range(m)} | {"router/entropy", "router/sparsity"}
    assert scalars <= set(tags["scalars"]), sorted(scalars - set(tags["scalars"]))


def test_callback_does_nothing_for_a_fusion_without_routing(tmp_path, minilm):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from mos_lightning.data import ShapesDataModule
    from mos_lightning.model.fusion import CrossAttentionFusion

    module = MoSModule(understanding=minilm, generation=GenerationTower(width=32, depth=2, heads=2),
                       fusion=CrossAttentionFusion, sample_steps=2)
    callback = RouterFigures(steps=2)
    trainer = L.Trainer(logger=TensorBoardLogger(tmp_path, name="cross", version=0), callbacks=[callback],
                        limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, datamodule=ShapesDataModule(batch_size=4, train_size=4, val_size=4), verbose=False)
    assert callback._routes is False, "the single-step probe must have seen no Routing"
    tags = EventAccumulator(str(tmp_path / "cross" / "version_0"), size_guidance={"images": 0}).Reload().Tags()
    assert "val/loss" in tags["scalars"], "the run itself must log"
    assert not [t for t in tags["images"] + tags["scalars"] if t.startswith("router/")]
