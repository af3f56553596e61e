"""Precision chosen from the hardware, the matmul rate, and the predicted work of a command."""
import sys
import time
from pathlib import Path

import pytest
import torch

from mos_lightning import budget, machine
from mos_lightning.budget import ArmWork, Plan, forward_flops
from mos_lightning.cli import MoSCLI

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from flops import training_flops  # noqa: E402

CONFIGS = ["--config", str(ROOT / "experiments" / "router_inputs.yaml"), "--config", str(ROOT / "tests" / "tiny.yaml"),
           "--trainer.logger=false"]


@pytest.mark.parametrize("native, precision, dtype", [(True, "bf16-mixed", "bfloat16"), (False, "32-true", "float32")])
def test_precision_follows_native_bf16(monkeypatch, native, precision, dtype):
    monkeypatch.setattr(machine, "native_bf16", lambda device: native)
    chosen, tower, why = machine.choose_precision("cpu")
    assert (chosen, tower) == (precision, dtype)
    assert ("no native bf16" in why) != native
    assert machine.auto_dtype() == dtype


def tower_dtype(cli) -> torch.dtype:
    return next(cli.model.model.understanding.model.parameters()).dtype


@pytest.mark.parametrize("native", [True, False])
def test_cli_chooses_precision_and_says_why(monkeypatch, capsys, native):
    monkeypatch.setattr(machine, "native_bf16", lambda device: native)
    cli = MoSCLI(args=CONFIGS, run=False)
    assert str(cli.trainer.precision) == ("bf16-mixed" if native else "32-true")
    assert tower_dtype(cli) == (torch.bfloat16 if native else torch.float32)
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("precision:")]
    assert len(line) == 1 and ("no native bf16" in line[0]) != native


def test_explicit_precision_and_dtype_win(monkeypatch, capsys):
    monkeypatch.setattr(machine, "native_bf16", lambda device: True)
    cli = MoSCLI(args=[*CONFIGS, "--trainer.precision=32-true", "--model.understanding.init_args.dtype=float32"],
                 run=False)
    assert str(cli.trainer.precision) == "32-true" and tower_dtype(cli) == torch.float32
    assert "precision:" not in capsys.readouterr().err  # nothing was chosen for the user


def test_matmul_peak_skips_a_size_its_budget_cannot_afford():
    """A 4096^2 matmul costs ~32768x a 128^2 one: with a 50 ms budget it must not be tried."""
    start = time.perf_counter()
    rate = machine.matmul_peak(torch.float32, sizes=(128, 4096), repeats=2, budget_s=0.05)
    assert rate > 0 and time.perf_counter() - start < 2.0


def test_cpu_info_reads_the_model_and_known_flags():
    model, flags = machine.cpu_info()
    assert model and set(flags) <= set(machine.FLAGS)
    if Path("/proc/cpuinfo").exists():
        text = Path("/proc/cpuinfo").read_text()
        assert model in text and all(f" {flag}" in text for flag in flags)


def test_counted_flops_equal_the_hand_formula():
    """torch's FLOP counter over one forward, x3 for a training step, against benchmarks/flops.py's formula."""
    cli = MoSCLI(args=[*CONFIGS, "--model.generation.init_args.width=48", "--model.generation.init_args.heads=2"],
                 run=False, announce=False)
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.val_dataloader()))
    two = type(batch)(batch.images[:2], batch.captions[:2])
    model = cli.model.model
    counted = 3 * 2 * forward_flops(model, two.captions, two.images)
    assert counted == pytest.approx(training_flops(model, two, model.states(two.captions)), rel=1e-3)


def test_plan_scales_what_is_left_by_the_measured_speed(monkeypatch):
    monkeypatch.setattr(budget, "UTILISATION", {"train": 0.3, "inference": 0.2})
    monkeypatch.setattr(budget, "ARM_OVERHEAD_S", 5.0)
    plan = Plan(rate=1e9)
    plan.add("a", ArmWork(train_flops=30e9, inference_flops=0.0, compile_s=20.0))  # 30e9/0.3/1e9 = 100 s
    plan.add("b", ArmWork(train_flops=0.0, inference_flops=39e9))  # 39e9 / 0.2 / 1e9 = 195 s
    assert plan.arms == pytest.approx({"a": 125.0, "b": 200.0}) and plan.total == pytest.approx(325.0)
    assert plan.eta("a", 0, 100) == pytest.approx(325.0)  # nothing measured yet: the prediction
    # from step 10 to 60 of arm a took 125 s where 62.5 s were predicted: everything left takes twice as long
    assert plan.eta("a", 60, 100, since=(10, 125.0)) == pytest.approx(2 * (0.4 * 125 + 200))
    assert plan.eta("b", 100, 100, since=(1, 150.0)) == pytest.approx(0.0)
