"""The CLI end to end: every arm of an ablation, the table, overlays, print_config, sample, bad input."""
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mos_lightning.cli import MoSCLI, arm_args, cli_main, read_experiment
from mos_lightning.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "tiny.yaml")
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))


def fit(tmp_path, *extra):
    return cli_main(["fit", "--config", str(ROOT / "experiments" / "router_inputs.yaml"), "--config", TINY,
                     f"--trainer.logger.init_args.save_dir={tmp_path}", *extra])


def test_fit_trains_every_arm_and_writes_the_table(router_inputs_run):
    tmp, rows, printed = router_inputs_run  # conftest.py: the session's one tiny fit of every arm
    assert [r["arm"] for r in rows] == ["prompt", "prompt_latent", "prompt_latent_timestep"]
    base = tmp / "router_inputs"
    for row in rows:
        run = base / row["arm"]
        assert list(run.glob("events.out.tfevents.*")), f"no TensorBoard run for {row['arm']}"
        assert row["steps"] == 2 and row["val/loss"] > 0 and row["val/loss@0"] > 0
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["model"]["fusion"]["init_args"]["inputs"] == row["arm"].split("_")
    with open(base / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["arm"] for r in table] == [r["arm"] for r in rows]
    assert float(table[0]["val/loss"]) == pytest.approx(rows[0]["val/loss"])
    assert "| prompt_latent |" in (base / "results.md").read_text()
    assert (base / "results.md").read_text().strip() in printed  # the table printed at the end is the one written
    # arms differ in trainable parameters exactly by what the router inputs add
    assert rows[0]["trainable_params"] < rows[1]["trainable_params"] < rows[2]["trainable_params"]


def test_sample_subcommand_writes_pngs(router_inputs_run, tmp_path, capsys):
    from PIL import Image

    runs, _, _ = router_inputs_run
    out = tmp_path / "samples"
    paths = cli_main(["sample", "--run", str(runs / "router_inputs" / "prompt"),
                      "--prompts", '["a red circle", "two blue squares"]',
                      "--out", str(out), "--steps", "2", "--image_size", "[16, 24]"])
    assert [p.name for p in paths] == ["000_a_red_circle.png", "001_two_blue_squares.png", "grid.png"]
    assert Image.open(paths[0]).size == (24, 16)
    assert Image.open(paths[2]).size == (1 + 2 * 25, 1 + 17)  # make_grid's 1 px padding around each
    big = cli_main(["sample", "--run", str(runs / "router_inputs" / "prompt"), "--prompts",
                    '["a red circle", "two blue squares"]', "--out", str(tmp_path / "big"), "--steps", "2",
                    "--image_size", "[16, 24]", "--nrow", "1", "--grid_scale", "3"])
    small = np.asarray(Image.open(paths[0]))  # the same prompt and seed: the same sample
    grid = np.asarray(Image.open(big[2]))
    assert grid.shape[:2] == (3 * (1 + 2 * 17), 3 * (1 + 25))  # one column of two, three times larger
    assert np.array_equal(grid[3:3 + 48:3, 3:3 + 72:3], small)  # every third pixel of the first cell
    assert np.array_equal(grid[3:3 + 48, 3:3 + 72], small.repeat(3, 0).repeat(3, 1))
    with pytest.raises(SystemExit) as stop:
        cli_main(["sample", "--run", str(runs / "router_inputs" / "prompt"), "--prompts", '["a"]',
                  "--grid_scale", "0"])
    assert stop.value.code == 2 and "sample --grid_scale: must be an int >= 1, got 0" in capsys.readouterr().err


def test_select_one_arm_and_unknown_arm(tmp_path, capsys):
    rows = fit(tmp_path, "--arm", "prompt_latent")
    assert [r["arm"] for r in rows] == ["prompt_latent"]
    with pytest.raises(SystemExit) as stop:
        fit(tmp_path, "--arm", "latent_only")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "'latent_only' is not an arm" in err and "prompt_latent_timestep" in err


def test_print_config_prints_every_arm(tmp_path, capsys):
    fit(tmp_path, "--print_config")
    printed = capsys.readouterr().out
    assert printed.count("seed_everything") == 3
    assert "inputs:\n      - prompt\n      - latent\n      - timestep" in printed


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_arm_instantiates(path):
    experiment = read_experiment(["--config", str(path)])
    assert experiment["arms"], f"{path.name} defines no arms"
    for name, overrides in experiment["arms"].items():
        cli = MoSCLI(args=["--config", str(path), *arm_args(name, overrides, experiment)], run=False)
        for key, value in overrides.items():
            assert _contains(cli.config[key], value), f"{path.name} arm {name}: {key} did not take {value}"
        assert cli.model.model.trainable_parameters() > 0


def _contains(resolved, wanted) -> bool:
    """The resolved setting holds every value the arm asked for (dicts may hold more)."""
    if hasattr(resolved, "as_dict"):
        resolved = resolved.as_dict()
    if isinstance(wanted, dict):
        return isinstance(resolved, dict) and all(_contains(resolved.get(k), v) for k, v in wanted.items())
    return resolved == wanted


BAD = [
    (["--model.fusion.init_args.top_k=0"], "top_k=0 is out of range: allowed 1..7"),
    (["--model.fusion.init_args.top_k=8"], "top_k=8 is out of range: allowed 1..7"),
    (["--model.fusion.init_args.epsilon=1.5"], "epsilon=1.5 is out of range: allowed [0, 1]"),
    (["--model.fusion.init_args.inputs=[prompt, noise]"], "router inputs"),
    (["--data.init_args.image_size=30"], "not divisible by model.generation.patch_size"),
    (["--model.understanding.init_args.path=/nonexistent/tower"], "does not exist"),
    (["--model.understanding.init_args.path=" + str(ROOT / "experiments")], "not a transformers model"),
    (["--model.parallelism.kernels=cuda"], "model.parallelism.kernels='cuda': allowed 'eager', 'triton'"),
    (["--model.parallelism.kernels=triton"], "model.parallelism.kernels='triton' needs a CUDA device"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[b[1][:24] for b in BAD])
def test_bad_input_is_a_clear_error_before_training(tmp_path, capsys, extra, message):
    assert_clear_error(tmp_path, capsys, extra, message)


def assert_clear_error(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as stop:
        fit(tmp_path, "--arm", "prompt", *extra)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.ckpt")), "nothing may train on a bad config"


def test_compile_without_a_cpp_compiler_is_a_config_error(tmp_path, capsys, monkeypatch):
    """model.compile on CPU with no C++ compiler: a clear error before the first step, not an inductor trace."""
    import torch._inductor.cpp_builder as cpp_builder
    from torch._inductor.exc import InvalidCxxCompiler

    def no_compiler():
        raise InvalidCxxCompiler()

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    assert_clear_error(tmp_path, capsys, ["--model.compile=true"],
                       "model.compile=true on CPU needs a C++ compiler for torch.compile, and none was found "
                       "(InvalidCxxCompiler); install g++ or set --model.compile=false")
    monkeypatch.undo()
    from mos_lightning.lit import check_compiler

    check_compiler(torch.device("cpu"))  # this machine has one: no error


def test_select_several_arms_keeps_the_experiment_order():
    from mos_lightning.cli.arms import select_arms

    experiment = read_experiment(["--config", str(ROOT / "experiments" / "router_inputs.yaml")])
    assert list(select_arms(experiment, "prompt_latent_timestep, prompt")) == ["prompt", "prompt_latent_timestep"]
    assert list(select_arms(experiment, None)) == ["prompt", "prompt_latent", "prompt_latent_timestep"]
    with pytest.raises(ConfigError, match="'nope' is not an arm .* \\(several: --arm a,b\\)"):
        select_arms(experiment, "prompt,nope")
