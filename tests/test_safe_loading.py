"""A checkpoint or run folder from someone else never runs code: crafted files that would create a marker
file if executed are refused with a clear error, and the marker never appears."""
import pathlib
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mos_lightning.cli import cli_main
from mos_lightning.cli.sample import load_module, named_classes

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this calls Path.touch(marker): what a malicious checkpoint would do with os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _evil_checkpoint(run: Path, marker: Path) -> Path:
    good = torch.load(next(run.glob("checkpoints/*.ckpt")), map_location="cpu", weights_only=True)
    good["hyper_parameters"] = {"lr": Payload(marker)}
    path = run / "checkpoints" / "evil.ckpt"
    torch.save(good, path)
    return path


def _copy_run(router_inputs_run, tmp_path: Path) -> Path:
    run = tmp_path / "router_inputs" / "prompt"
    shutil.copytree(router_inputs_run.runs / "router_inputs" / "prompt", run)
    return run


def test_payload_does_run_when_unpickled_unsafely(tmp_path):
    """The crafted file is live: torch.load(weights_only=False) would create the marker (so the tests
    below would catch a loader that runs it)."""
    marker = tmp_path / "marker"
    torch.save({"x": Payload(marker)}, tmp_path / "p.ckpt")
    torch.load(tmp_path / "p.ckpt", weights_only=False)
    assert marker.exists()


def test_sample_refuses_a_crafted_checkpoint(router_inputs_run, tmp_path, capsys):
    run = _copy_run(router_inputs_run, tmp_path)
    marker = tmp_path / "marker"
    evil = _evil_checkpoint(run, marker)
    with pytest.raises(SystemExit) as stop:
        cli_main(["sample", "--run", str(run), "--ckpt_path", str(evil), "--prompts", '["a red circle"]',
                  "--out", str(tmp_path / "out"), "--steps", "1"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "holds more than tensors" in err and "Traceback" not in err
    assert not marker.exists()


def test_fit_resume_refuses_a_crafted_checkpoint(router_inputs_run, tmp_path):
    run = _copy_run(router_inputs_run, tmp_path)
    marker = tmp_path / "marker"
    evil = _evil_checkpoint(run, marker)
    with pytest.raises(Exception, match="Weights only load failed"):
        cli_main(["fit", "--config", str(ROOT / "experiments" / "router_inputs.yaml"), "--config",
                  str(ROOT / "tests" / "tiny.yaml"), "--arm", "prompt", f"--ckpt_path={evil}",
                  f"--trainer.logger.init_args.save_dir={tmp_path / 'resumed'}"])
    assert not marker.exists()


def test_fit_refuses_weights_only_false(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli_main(["fit", "--config", str(ROOT / "experiments" / "router_inputs.yaml"), "--config",
                  str(ROOT / "tests" / "tiny.yaml"), "--arm", "prompt", "--weights_only=false",
                  f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert stop.value.code == 2
    assert "weights_only=false" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """A module on sys.path that creates a marker file when imported."""
    marker = tmp_path / "imported"
    (tmp_path / "evil_pkg.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                          "class Timesteps:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    sys.modules.pop("evil_pkg", None)


@pytest.mark.parametrize("where", ["timesteps", "string"])
def test_a_crafted_config_names_an_untrusted_class(router_inputs_run, tmp_path, evil_module, capsys, where):
    run = _copy_run(router_inputs_run, tmp_path)
    config = yaml.safe_load((run / "config.yaml").read_text())
    if where == "timesteps":
        config["model"]["timesteps"] = {"class_path": "evil_pkg.Timesteps"}
    else:  # a bare dotted string, which jsonargparse would also resolve to a class
        config["trainer"]["strategy"] = "evil_pkg.Timesteps"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as stop:
        cli_main(["sample", "--run", str(run), "--prompts", '["a red circle"]', "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "evil_pkg.Timesteps is not a class this kit trusts" in err and "--trust" in err
    assert not evil_module.exists()


def test_trusted_prefixes_and_what_counts_as_a_class(router_inputs_run, tmp_path):
    run = _copy_run(router_inputs_run, tmp_path)
    module = load_module(run, next(run.glob("checkpoints/*.ckpt")))  # the kit's own run loads
    assert module.model.trainable_parameters() > 0
    found = dict(named_classes({"a": {"class_path": "x.Y"}, "b": ["os.path.join", "model.safetensors", "bf16-mixed",
                                                                   "0.5", "shapes-clip"]}))
    assert found == {"a.class_path": "x.Y", "b[0]": "os.path.join"}
