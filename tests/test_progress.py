"""Progress a log can read: plain lines with arm, step/total, loss, it/s and ETA; the prediction beside the time."""
import re
from pathlib import Path
from types import SimpleNamespace

from mos_lightning.callbacks.progress import StepProgress
from mos_lightning.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]


def test_a_fit_prints_its_prediction_then_plain_progress_lines(tmp_path, capsys):
    rows = cli_main(["fit", "--config", str(ROOT / "experiments" / "router_inputs.yaml"), "--config",
                     str(ROOT / "tests" / "tiny.yaml"), "--arm", "prompt", "--trainer.enable_progress_bar=true",
                     "--trainer.max_steps=3", "--trainer.val_check_interval=3",
                     f"--trainer.logger.init_args.save_dir={tmp_path}"])
    err = capsys.readouterr().err  # not a terminal under pytest: plain lines, no bar
    lines = err.splitlines()
    first = next(i for i, x in enumerate(lines) if x.startswith("[prompt] step"))
    assert any(x.startswith("machine: ") and "matmul" in x for x in lines[:first])
    assert any(x.startswith("predicted wall time: ") for x in lines[:first])  # before the first step
    pattern = r"\[prompt\] step (\d+)/3  loss \d+\.\d{4}  \d+\.\d\d it/s(  arm ETA \d+m\d\ds)?  command ETA \d+m\d\ds"
    steps = [(int(m.group(1)), bool(m.group(2))) for x in lines if (m := re.fullmatch(pattern, x))]
    assert steps == [(1, False), (3, True)]  # the first and last step (every 50 by default); an arm ETA after the first
    assert "Epoch" not in err
    assert rows[0]["predicted_s"] > 0 and rows[0]["wall_s"] > 0
    assert any(re.match(r"wall time: \d+m\d\ds against \d+m\d\ds predicted \(\d+\.\d\dx\)", x) for x in lines)


def test_the_bar_is_labelled_by_arm_and_steps_not_epochs():
    bar = StepProgress(arm="prompt_latent")
    bar._trainer = SimpleNamespace(max_steps=600, num_training_batches=625)
    assert bar._get_train_description(0) == "prompt_latent (600 steps)"
    assert bar.total_train_batches == 600  # steps over the whole run, whatever the epoch length


def test_a_line_counts_only_training_time():
    bar = StepProgress(every_n_steps=10, arm="a")
    bar._last_time, bar._last_step, bar._paused = 0.0, 0, 0.0
    assert bar.line(1, 100, 0.5, now=60.0) == "[a] step 1/100  loss 0.5000  0.02 it/s"  # the compile: no ETA
    bar._paused = 5.0  # a validation took 5 s of the next 15
    assert bar.line(21, 100, None, now=75.0) == "[a] step 21/100  2.00 it/s  arm ETA 0m40s"  # 20 steps in 10 s
    assert (bar._last_time, bar._last_step, bar._paused) == (75.0, 21, 0.0)
