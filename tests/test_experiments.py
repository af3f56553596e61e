"""Every ablation YAML: each arm resolves, and arms differ only in what the ablation names."""
from pathlib import Path

import pytest

from mos_lightning.cli import MoSCLI, arm_args, read_experiment

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "tiny.yaml")
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))
RUN_KEYS = ("experiment.arm", "trainer.logger.init_args.version")  # differ by design


def _flat(value, prefix=""):
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def resolve(path: Path, name: str, experiment: dict, tiny: bool = True):
    overrides = experiment["arms"][name]
    configs = ["--config", str(path)] + (["--config", TINY] if tiny else [])
    return MoSCLI(args=[*configs, *arm_args(name, overrides, experiment)], run=False)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_arms_differ_only_in_what_the_ablation_names(path):
    experiment = read_experiment(["--config", str(path)])
    assert experiment["arms"], f"{path.name} has no arms"
    if len(experiment["arms"]) == 1:  # a study (quality.yaml), not an ablation: it only has to resolve
        assert resolve(path, next(iter(experiment["arms"])), experiment, tiny=False).config.trainer.max_steps > 0
        return
    named = {key for arm in experiment["arms"].values() for key in arm}
    configs = {name: _flat(resolve(path, name, experiment, tiny=False).config.as_dict()) for name in experiment["arms"]}
    first, *others = configs.values()
    for name, config in configs.items():
        differing = {k for k in set(first) | set(config) if first.get(k) != config.get(k)} - set(RUN_KEYS)
        stray = {k for k in differing if not any(k == n or k.startswith(n + ".") for n in named)}
        assert not stray, f"{path.name} arm {name} differs outside the ablation: {sorted(stray)}"
    assert any(config != first for config in others), f"{path.name}: arms resolve to the same config"


def test_fusion_arms_have_equal_trainable_parameters():
    path = ROOT / "experiments" / "fusion.yaml"
    experiment = read_experiment(["--config", str(path)])
    counts = {name: resolve(path, name, experiment, tiny=False).model.model.trainable_parameters()
              for name in experiment["arms"]}
    mos = counts["mos"]
    for name, count in counts.items():
        assert abs(count - mos) / mos <= 0.05, f"{name}: {count} vs MoS {mos} trainable parameters"


# MoT needs the generation tower to mirror the tower: two MiniLM layers, 12 heads of 32
SYMMETRIC = ["--model.understanding.init_args.num_layers=2", "--model.generation.init_args.width=384",
             "--model.generation.init_args.depth=2", "--model.generation.init_args.heads=12"]


SLOW = pytest.mark.slow  # over ~5 s: the most arms (fusion), or a 384-wide generation tower (MoT)


@pytest.mark.parametrize("name, extra", [pytest.param("fusion", [], marks=SLOW), ("layer_selection", []),
                                         ("prediction_granularity", []), ("operation_space", []),
                                         pytest.param("mot_vs_mos", SYMMETRIC, marks=SLOW)],
                         ids=lambda v: str(v)[:24])
def test_every_strategy_trains_through_the_cli(tmp_path, name, extra):
    from mos_lightning.cli import cli_main

    rows = cli_main(["fit", "--config", str(ROOT / "experiments" / f"{name}.yaml"), "--config", TINY,
                     f"--trainer.logger.init_args.save_dir={tmp_path}", *extra])
    experiment = read_experiment(["--config", str(ROOT / "experiments" / f"{name}.yaml")])
    assert [r["arm"] for r in rows] == list(experiment["arms"])
    for row in rows:
        assert row["steps"] == 2 and row["val/loss"] == row["val/loss"]  # trained, and not NaN
    assert (tmp_path / name / "results.csv").is_file()
