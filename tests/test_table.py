"""The ablation table rebuilt from event files equals the one `fit` printed; HParams are logged per arm."""
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from mos_lightning.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ablation(router_inputs_run):
    """The session's one tiny fit of every arm of router_inputs.yaml (conftest.py)."""
    return router_inputs_run.runs / "router_inputs", router_inputs_run.rows, router_inputs_run.printed


def test_table_rebuilt_from_event_files_matches_the_printed_one(ablation, capsys):
    folder, rows, printed_by_fit = ablation
    written = (folder / "results.md").read_text().strip()
    assert written in printed_by_fit  # what fit printed is what it wrote
    capsys.readouterr()
    rebuilt = cli_main(["table", str(folder)]).strip()
    assert rebuilt == written and rebuilt in capsys.readouterr().out
    assert [line.split("|")[1].strip() for line in written.splitlines()[2:]] == [r["arm"] for r in rows]


def test_each_arm_logs_hparams_with_its_final_metrics(ablation):
    folder, rows, _ = ablation
    for row in rows:
        events = EventAccumulator(str(folder / row["arm"]), size_guidance={"tensors": 0})
        events.Reload()
        content = events.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        params = dict(start.session_start_info.hparams)
        assert params["arm"].string_value == row["arm"]
        assert params["model.fusion.init_args.inputs"].string_value  # the setting the arms differ in
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
        names = {m.name.tag for m in experiment.experiment.metric_infos}
        assert "val/loss" in names and names <= set(events.Tags()["scalars"]) | {"val/loss"}


def test_table_of_a_folder_without_runs_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli_main(["table", str(tmp_path)])
    assert stop.value.code == 2 and "no finished arm" in capsys.readouterr().err
