"""`fit --seeds 0,1,2`: one run per arm and seed, the mean ± std table, and the paper's direction checked."""
import csv
import io
import math
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mos_lightning.cli import cli_main
from mos_lightning.cli.fit import parse_seeds
from mos_lightning.cli.table import latest_per_seed, table_main
from mos_lightning.errors import ConfigError
from mos_lightning.results import Spread, check_paper, markdown, report, summarize, verdict, write_table

ROOT = Path(__file__).resolve().parents[1]
ROUTER_INPUTS = str(ROOT / "experiments" / "router_inputs.yaml")
TINY = str(ROOT / "tests" / "tiny.yaml")
METRICS = ("val/fid", "val/clip", "val/loss")
# validation is most of a tiny run's forwards: one batch at one timestep, no sanity check (4 runs stay quick)
CHEAP_VALIDATION = ["--data.init_args.val_size=8", "--model.val_timesteps=[0.5]", "--trainer.num_sanity_val_steps=0"]


def random_runs(rng: torch.Generator) -> list[dict]:
    """Three arms with 2..5 seeds each, random metrics; rows interleaved seed by seed, as `fit` runs them."""
    counts = {arm: int(torch.randint(2, 6, (1,), generator=rng)) for arm in ("a", "b", "c")}
    rows = []
    for seed in range(max(counts.values())):
        for arm, n in counts.items():
            if seed < n:
                values = (torch.rand(len(METRICS), generator=rng, dtype=torch.float64) * 30).tolist()
                rows.append({"arm": arm, "seed": seed, **dict(zip(METRICS, values)),
                             "trainable_params": 1000 + ord(arm), "wall_s": float(torch.rand(1, generator=rng))})
    return rows


def test_summary_is_mean_and_sample_std_per_arm(rng):
    rows = random_runs(rng)
    summary = summarize(rows)
    assert [s["arm"] for s in summary] == ["a", "b", "c"]
    for line in summary:
        runs = [r for r in rows if r["arm"] == line["arm"]]
        assert line["n"] == len(runs) and "seed" not in line
        for metric in METRICS:
            values = np.array([r[metric] for r in runs])
            assert line[metric].n == len(values)
            assert line[metric].mean == pytest.approx(values.mean(), rel=1e-12)
            assert line[metric].std == pytest.approx(values.std(ddof=1), rel=1e-12)
            assert line[metric].se == pytest.approx(values.std(ddof=1) / np.sqrt(len(values)), rel=1e-12)
        assert line["trainable_params"] == runs[0]["trainable_params"]  # the same in every run: as is
        assert line["wall_s"] == pytest.approx(np.mean([r["wall_s"] for r in runs]))


def test_tables_of_several_seeds(tmp_path, rng, capsys):
    rows = random_runs(rng)
    rows += [{"arm": "d", "seed": s, "val/fid": v} for s, v in enumerate((0.0834, 0.0846, 0.0858))]
    text = write_table(rows, tmp_path)
    assert "| d | 3 | 0.0846 ± 0.0012 |" in text  # sample std of three values 0.0012 apart is 0.0012
    assert (tmp_path / "results.md").read_text() == text + "\n" and text in capsys.readouterr().out
    assert text.endswith(markdown(rows))  # every run under the summary
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["arm"] for r in table] == ["a", "b", "c", "d"]
    for line, written in zip(summarize(rows), table):
        assert int(written["n"]) == line["n"]
        assert float(written["val/fid_mean"]) == pytest.approx(line["val/fid"].mean)
        assert float(written["val/fid_std"]) == pytest.approx(line["val/fid"].std)
    with open(tmp_path / "results_runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert [(r["arm"], int(r["seed"])) for r in runs] == [(r["arm"], r["seed"]) for r in rows]


def test_one_seed_keeps_the_table_as_before(tmp_path):
    rows = [{"arm": "a", "seed": 0, "val/loss": 1.5, "steps": 2}, {"arm": "b", "seed": 0, "val/loss": 1.25, "steps": 2}]
    (tmp_path / "results_runs.csv").write_text("stale\n")
    text = write_table(rows, tmp_path)
    assert text == "| arm | val/loss | steps |\n|---|---|---|\n| a | 1.5 | 2 |\n| b | 1.25 | 2 |"
    assert (tmp_path / "results.csv").read_text().splitlines() == ["arm,val/loss,steps", "a,1.5,2", "b,1.25,2"]
    assert not (tmp_path / "results_runs.csv").exists()


def spreads(**arms) -> list[dict]:
    """Summary rows from hand-made per-seed values: arm -> {metric: [values]}."""
    return summarize([{"arm": arm, "seed": i, **{m: v[i] for m, v in metrics.items()}}
                      for arm, metrics in arms.items() for i in range(len(next(iter(metrics.values()))))])


def test_verdict_lower_is_better_and_agrees():
    summary = spreads(mos={"val/fid": [1.0, 1.2]}, near={"val/fid": [1.5, 1.7]}, far={"val/fid": [3.0, 3.4]})
    # margin 0.5 over sqrt(0.1^2 + 0.1^2): se = std / sqrt(2) = 0.1414 / 1.414 = 0.1 for both
    assert verdict(summary, "mos", "val/fid", "lower") == (
        "val/fid (lower is better): mos vs near (next best): 1.1 vs 1.6, difference -0.5, better by 3.5 SE — "
        "same direction as the paper")


def test_verdict_higher_is_better_and_disagrees():
    summary = spreads(mos={"val/clip": [20.0, 22.0, 24.0]}, low={"val/clip": [1.0, 2.0, 3.0]},
                      top={"val/clip": [22.0, 23.0, 24.0]})
    line = verdict(summary, "mos", "val/clip", "higher")
    se = math.sqrt((2 / math.sqrt(3)) ** 2 + (1 / math.sqrt(3)) ** 2)
    assert f"mos vs top (next best): 22 vs 23, difference -1, worse by {1 / se:.1f} SE" in line
    assert line.endswith("— not the paper's direction")
    # read as lower-is-better, the rival is the arm with the lowest mean, which mos does not beat either
    assert "mos vs low (next best)" in verdict(summary, "mos", "val/clip", "lower")
    assert "not the paper's direction" in verdict(summary, "mos", "val/clip", "lower")


def test_verdict_skips_what_is_not_in_the_rows():
    summary = spreads(mos={"val/loss": [1.0, 2.0]}, other={"val/loss": [1.0, 2.0]})
    assert verdict(summary, "mos", "val/fid", "lower") == "val/fid: skipped, not in the rows (no run logged it)"
    text = report([{"arm": a, "seed": s, "val/loss": 1.0 + s} for s in (0, 1) for a in ("mos", "other")],
                  {"best": "mos", "metrics": {"val/fid": "lower", "val/loss": "lower"}})
    assert "- val/fid: skipped" in text and "- val/loss (lower is better): mos vs other" in text and "level" in text


def test_a_rerun_seed_replaces_the_earlier_one():
    rows = [{"arm": "a", "seed": 0, "x": 1}, {"arm": "a", "seed": 1, "x": 2}, {"arm": "a", "seed": 0, "x": 3}]
    assert latest_per_seed(rows) == [rows[1], rows[2]]


@pytest.mark.parametrize("paper, message", [
    ({"best": "latent_only", "metrics": {"val/fid": "lower"}}, "experiment.paper.best='latent_only' is not an arm"),
    ({"best": "prompt", "metrics": {"val/fid": "smaller"}}, "experiment.paper.metrics.val/fid='smaller': allowed"),
    ({"best": "prompt", "metrics": {}}, "experiment.paper.metrics: expected"),
    ({"best": "prompt"}, "experiment.paper: expected exactly the keys best"),
])
def test_bad_paper_block_is_a_config_error_before_training(tmp_path, capsys, paper, message):
    overlay = tmp_path / "paper.yaml"
    overlay.write_text(yaml.safe_dump({"experiment": {"paper": paper}}))
    with pytest.raises(ConfigError, match="experiment.paper"):
        check_paper(paper, ["prompt", "prompt_latent"])
    with pytest.raises(SystemExit) as stop:
        cli_main(["fit", "--config", ROUTER_INPUTS, "--config", str(overlay), "--seeds", "0,1",
                  f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.rglob("events.out.tfevents.*")), "nothing may train on a bad config"


def test_parse_seeds():
    assert parse_seeds(None) is None
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds(" 7 , 3") == [7, 3] and parse_seeds("5") == [5]


@pytest.mark.parametrize("extra, message", [
    (["--seeds", "a,b"], "--seeds 'a,b': 'a' is not an integer"),
    (["--seeds="], "--seeds is empty"),
    (["--seeds", "1,2,1"], "--seeds '1,2,1': 1 is repeated"),
    (["--seeds", "0,-1"], "--seeds '0,-1': -1 is negative"),
    (["--seeds", "4294967296"], "is too large"),
    (["--seeds"], "--seeds needs a value"),
    (["--seeds", "0,1", "--seed_everything=3"], "--seeds sets seed_everything for each run"),
    (["--seeds", "0,1", "--arm", "prompt", "--ckpt_path=last"], "--ckpt_path resumes one run; give one seed"),
])
def test_bad_seeds_are_a_config_error_before_training(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as stop:
        cli_main(["fit", "--config", ROUTER_INPUTS, "--config", TINY, f"--trainer.logger.init_args.save_dir={tmp_path}",
                  *extra])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if "is not an integer" in message or "needs a value" in message or "is empty" in message:
        assert "allowed: distinct integers 0..4294967295" in err
    assert not list(tmp_path.rglob("events.out.tfevents.*")), "nothing may train on a bad --seeds"


def hparams_seed(run: Path) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(run))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return start.hparams["seed_everything"].number_value


@pytest.mark.slow
def test_fit_two_seeds_of_two_arms(tmp_path, capsys, monkeypatch):
    import mos_lightning.cli.fit as fit_module
    from mos_lightning import budget

    built = []

    def counted(module, *args, **kwargs):
        built.append(module)
        return budget.arm_work(module, *args, **kwargs)

    monkeypatch.setattr(fit_module, "arm_work", counted)
    arms = {"prompt": {"model.fusion.init_args.inputs": ["prompt"]},
            "prompt_latent_timestep": {"model.fusion.init_args.inputs": ["prompt", "latent", "timestep"]}}
    overlay = tmp_path / "two_arms.yaml"
    overlay.write_text(yaml.safe_dump({"experiment": {"arms": arms}, "trainer": {"callbacks": []}}))  # no sampling
    runs = tmp_path / "runs"
    rows = cli_main(["fit", "--config", ROUTER_INPUTS, "--config", TINY, "--config", str(overlay), "--seeds", "0,1",
                     f"--trainer.logger.init_args.save_dir={runs}", *CHEAP_VALIDATION])
    printed = capsys.readouterr()
    assert len(built) == 2, "the plan builds each arm once, not once per seed"
    assert "predicted wall time:" in printed.err and "for 2 arm(s) x 2 seed(s)" in printed.err
    assert [(r["arm"], r["seed"]) for r in rows] == [("prompt", 0), ("prompt_latent_timestep", 0), ("prompt", 1),
                                                     ("prompt_latent_timestep", 1)]
    base = runs / "router_inputs"
    for row in rows:
        run = base / row["arm"] / f"seed{row['seed']}"
        assert list(run.glob("events.out.tfevents.*")), f"no TensorBoard run at {run}"
        assert yaml.safe_load((run / "config.yaml").read_text())["seed_everything"] == row["seed"]
        assert hparams_seed(run) == row["seed"]
        assert row["predicted_s"] > 0
    for arm in arms:
        losses = [r["val/loss"] for r in rows if r["arm"] == arm]
        assert losses[0] != losses[1], f"{arm}: seeds 0 and 1 trained to the same loss"
    with open(base / "results_runs.csv") as f:
        assert sorted(r["arm"] for r in csv.DictReader(f)) == sorted([*arms, *arms])
    written = (base / "results.md").read_text()
    assert "±" in written and "| prompt | 2 |" in written
    assert "- val/fid: skipped, not in the rows" in written  # tests/tiny.yaml has no Evaluation callback
    assert "- val/clip: skipped" in written
    assert written.strip() in printed.out
    with open(base / "results.csv") as f:
        summary = {r["arm"]: r for r in csv.DictReader(f)}
    mean = np.mean([r["val/loss"] for r in rows if r["arm"] == "prompt"])
    assert float(summary["prompt"]["val/loss_mean"]) == pytest.approx(mean)

    with redirect_stdout(io.StringIO()):
        rebuilt = table_main([str(base)])
        table_main([str(base), "--write", str(tmp_path / "rebuilt")])
    assert rebuilt == written.rstrip("\n"), "`table` rebuilds the summary fit wrote"
    assert (tmp_path / "rebuilt" / "results.csv").read_text() == (base / "results.csv").read_text()
    assert (tmp_path / "rebuilt" / "results_runs.csv").read_text() == (base / "results_runs.csv").read_text()


def test_spread_of_one_run_has_no_std():
    one = Spread(2.0, None, 1)
    assert one.se is None and markdown([{"arm": "a", "n": 1, "val/fid": one}]).endswith("| a | 1 | 2 |")
