"""The EMA of trainable parameters: against a float64 reference from the parameter history, in and out of
the shadow, through a checkpoint, and what validation and `sample` see in a fit."""
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from mos_lightning.cli import cli_main
from mos_lightning.cli.sample import load_module
from mos_lightning.ema import Ema
from mos_lightning.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _train(model: torch.nn.Module, ema: Ema, steps: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """AdamW steps on fresh random data; returns the float64 parameters after each step (1-based)."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    history = []
    for step in range(1, steps + 1):
        x = torch.randn(16, 7, generator=g)
        loss = (model(x) - x.sum(-1, keepdim=True).sin()).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(step)
        history.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
    return history


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.GELU(), torch.nn.Linear(13, 1))
    model[0].bias.requires_grad_(False)  # frozen: not averaged
    return model


@pytest.mark.parametrize("decay,every,start", [(0.9, 1, 0), (0.8, 3, 2), (0.95, 2, 5)])
def test_ema_equals_float64_reference(decay, every, start):
    model = _model(1)
    ema = Ema(decay, every, start)
    ema.bind(model.named_parameters())
    history = _train(model, ema, 14, seed=int(torch.randint(0, 2**31, ())))
    reference = None
    for step, params in enumerate(history, 1):
        if step < start or (step - start) % every:
            continue
        if reference is None:
            reference = dict(params)
        else:  # the hand formula, compounded over `every` steps
            a = decay ** every
            reference = {n: a * reference[n] + (1 - a) * params[n] for n in reference}
    assert ema.names == ["0__weight", "2__weight", "2__bias"]
    for name, shadow in zip(["0.weight", "2.weight", "2.bias"], ema.shadow):
        torch.testing.assert_close(shadow.double(), reference[name], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(shadow.double(), history[-1][name])  # an average, not the last weights


def test_swap_and_state_dict_round_trip():
    model = _model(2)
    ema = Ema(0.7)
    ema.bind(model.named_parameters())
    _train(model, ema, 5, seed=3)
    raw = [p.detach().clone() for p in ema.params]
    shadow = [s.clone() for s in ema.shadow]
    ema.swap()
    for p, s in zip(ema.params, shadow):
        assert torch.equal(p, s)
    ema.swap()
    for p, r in zip(ema.params, raw):
        assert torch.equal(p, r)

    other = _model(4)  # other weights: the restored average must come from the state dict, not from these
    restored = Ema(0.7)
    restored.bind(other.named_parameters())
    assert not torch.equal(restored.shadow[0], shadow[0])
    restored.load_state_dict(ema.state_dict())
    assert bool(restored.started) and set(ema.state_dict()) == {"started", "0__weight", "2__weight", "2__bias"}
    for a, b in zip(restored.shadow, shadow):
        assert torch.equal(a, b)


def test_swap_before_start_leaves_parameters():
    model = _model(5)
    ema = Ema(0.9, start=100)
    ema.bind(model.named_parameters())
    _train(model, ema, 3, seed=6)
    before = [p.detach().clone() for p in ema.params]
    ema.swap()
    assert not ema.started and all(torch.equal(p, b) for p, b in zip(ema.params, before))


@pytest.mark.parametrize("kwargs,setting", [({"decay": 1.0}, "model.ema.decay"), ({"decay": 0.0}, "model.ema.decay"),
                                            ({"every": 0}, "model.ema.every"), ({"start": -1}, "model.ema.start")])
def test_bad_settings_name_the_setting(kwargs, setting):
    with pytest.raises(ConfigError, match=setting):
        Ema(**kwargs)


class WeightProbe(L.Callback):
    """Saves one trainable weight as the validation callbacks see it, and as it is once validation ends."""

    def __init__(self, path: str):
        self.path, self.seen = path, {"steps": []}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen["steps"].append(pl_module.model.generation.head.weight.detach().double().clone())

    def on_validation_epoch_end(self, trainer, pl_module):
        self.seen["validation"] = pl_module.model.generation.head.weight.detach().clone()

    def on_validation_end(self, trainer, pl_module):
        self.seen["after"] = pl_module.model.generation.head.weight.detach().clone()
        torch.save(self.seen, self.path)


def test_fit_validates_and_samples_with_the_ema(tmp_path):
    callbacks = [{"class_path": "test_ema.WeightProbe", "init_args": {"path": str(tmp_path / "seen.pt")}},
                 {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"filename": "{step}"}}]
    overlay = {"trainer": {"max_steps": 4, "val_check_interval": 4, "limit_val_batches": 1, "callbacks": callbacks},
               "model": {"ema": {"class_path": "mos_lightning.ema.Ema", "init_args": {"decay": 0.5, "start": 1}}}}
    (tmp_path / "ema.yaml").write_text(yaml.safe_dump(overlay))
    cli_main(["fit", "--config", str(ROOT / "experiments" / "router_inputs.yaml"), "--config",
              str(ROOT / "tests" / "tiny.yaml"), "--config", str(tmp_path / "ema.yaml"), "--arm", "prompt",
              f"--trainer.logger.init_args.save_dir={tmp_path}"])
    run = tmp_path / "router_inputs" / "prompt"
    ckpt = next(run.glob("checkpoints/*.ckpt"))
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    shadow = checkpoint["state_dict"]["ema.generation__head__weight"]
    raw = checkpoint["state_dict"]["model.generation.head.weight"]
    seen = torch.load(tmp_path / "seen.pt")
    reference = seen["steps"][0]  # start 1: the weights after the first optimizer step, then decay 0.5 a step
    for weights in seen["steps"][1:]:
        reference = 0.5 * reference + 0.5 * weights
    assert len(seen["steps"]) == 4
    torch.testing.assert_close(shadow.double(), reference, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(shadow, raw)
    assert torch.equal(seen["validation"], shadow)  # the callbacks sampled with the average
    assert torch.equal(seen["after"], raw)  # and the checkpoint (and training) kept the raw weights
    assert torch.equal(load_module(run, ckpt).model.generation.head.weight, shadow)  # `sample` uses the average


def _ema_fit(tmp_path: Path, name: str, *extra: str) -> Path:
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"every_n_train_steps": 3, "save_top_k": -1, "filename": "{step}"}}]
    overlay = {"trainer": {"max_steps": 6, "val_check_interval": 100, "limit_val_batches": 1, "callbacks": callbacks},
               "model": {"ema": {"class_path": "mos_lightning.ema.Ema", "init_args": {"decay": 0.6, "start": 1}}}}
    (tmp_path / "ema.yaml").write_text(yaml.safe_dump(overlay))
    cli_main(["fit", "--config", str(ROOT / "experiments" / "router_inputs.yaml"), "--config",
              str(ROOT / "tests" / "tiny.yaml"), "--config", str(tmp_path / "ema.yaml"), "--arm", "prompt",
              f"--trainer.logger.init_args.save_dir={tmp_path / name}", *extra])
    return tmp_path / name / "router_inputs" / "prompt" / "checkpoints"


def test_resume_continues_the_ema_exactly(tmp_path):
    full = _ema_fit(tmp_path, "full")
    resumed = _ema_fit(tmp_path, "resumed", f"--ckpt_path={full / 'step=3.ckpt'}")
    a, b = ({k: v for k, v in torch.load(folder / "step=6.ckpt", map_location="cpu", weights_only=True)
             ["state_dict"].items() if k.startswith("ema.")} for folder in (full, resumed))
    assert a.keys() == b.keys() and len(a) > 10 and bool(a["ema.started"])
    for name in a:
        assert torch.equal(a[name], b[name]), name
