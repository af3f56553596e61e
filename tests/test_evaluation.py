"""The evaluation callback: FID, CLIP and ShapesEval logged per arm offline; bad settings fail before training."""
import json
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mos_lightning.callbacks.evaluation import Evaluation
from mos_lightning.cli import cli_main
from mos_lightning.data.shapes import CATEGORIES
from mos_lightning.evaluation.prompts import MJHQPrompts, ShapesPrompts

ROOT = Path(__file__).resolve().parents[1]


def _fit(tmp_path: Path, evaluation: dict, *extra: str) -> list[dict]:
    callback = {"class_path": "mos_lightning.callbacks.Evaluation", "init_args": evaluation}
    overlay = {"trainer": {"callbacks": [callback]}}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(overlay))
    return cli_main(["fit", "--config", str(ROOT / "experiments" / "router_inputs.yaml"), "--config",
                     str(ROOT / "tests" / "tiny.yaml"), "--config", str(tmp_path / "eval.yaml"), "--arm", "prompt",
                     f"--trainer.logger.init_args.save_dir={tmp_path}", *extra])


def test_reference_images_score_as_perfect():
    """The scorer on the prompt set's own renders: FID ~ 0, ShapesEval 1, CLIP above shuffled captions."""
    evaluation = Evaluation(ShapesPrompts(per_category=6))
    evaluation.eval_set = evaluation.prompts.build((32, 32))
    from mos_lightning.callbacks.evaluation import cached_clip, cached_fid
    from mos_lightning.evaluation.clip import mean_clip_score

    evaluation.clip = cached_clip("shapes-clip", None)
    evaluation.fid = cached_fid("open-clip:shapes-clip", None, "shapes-clip", None, None)
    reference = evaluation.eval_set.reference
    metrics, record = evaluation.scores(reference, {"cfg": 1.0})
    assert abs(metrics["val/fid"]) < 1e-3
    assert metrics["val/shapes/overall"] == 1.0 and all(metrics[f"val/shapes/{c}"] == 1.0 for c in CATEGORIES)
    shuffled = evaluation.eval_set.captions[1:] + evaluation.eval_set.captions[:1]
    assert metrics["val/clip"] > mean_clip_score(evaluation.clip, reference, shuffled) + 1.0
    assert record["fid"]["settings"]["num_samples"] == record["count"] == len(reference) == 36


def test_fit_logs_fid_clip_and_shapes_eval_per_arm(tmp_path):
    rows = _fit(tmp_path, {"prompts": {"class_path": "mos_lightning.evaluation.prompts.ShapesPrompts",
                                       "init_args": {"per_category": 3}}})
    row = rows[0]
    for key in ("val/fid", "val/clip", "val/shapes/overall", *(f"val/shapes/{c}" for c in CATEGORIES)):
        assert isinstance(row[key], float), key
    assert list(row)[:2] == ["arm", "seed"] and isinstance(row["seed"], int)
    assert list(row)[2:5] == ["val/fid", "val/clip", "val/shapes/overall"]  # the paper's tables lead with FID, CLIP
    assert row["val/fid"] > 0 and 0 <= row["val/shapes/overall"] <= 1
    run = tmp_path / "router_inputs" / "prompt"
    events = EventAccumulator(str(run))
    events.Reload()
    assert {"val/fid", "val/clip", "val/shapes/overall"} <= set(events.Tags()["scalars"])
    record = json.loads(next((run / "eval").glob("step=*.json")).read_text())
    settings = record["fid"]["settings"]
    for key in ("cfg", "steps", "seed", "precision"):
        assert settings[key] is not None, key
    assert record["count"] == record["fid"]["settings"]["num_samples"] == 18
    assert record["metrics"]["val/fid"] == pytest.approx(row["val/fid"])


def test_final_samples_per_prompt_averages_over_seeds(tmp_path):
    """Three images per prompt at the end: the first repeat is what one sample per prompt gives (same seeds),
    ShapesEval over all is the mean of the repeats' (categories are balanced), FID is over one per prompt."""
    prompts = {"class_path": "mos_lightning.evaluation.prompts.ShapesPrompts", "init_args": {"per_category": 2}}

    def record(name: str, **settings) -> dict:
        (tmp_path / name).mkdir()
        _fit(tmp_path / name, {"prompts": prompts, **settings})
        return json.loads(next((tmp_path / name / "router_inputs" / "prompt" / "eval").glob("step=*.json")).read_text())

    one, three = record("one"), record("three", final_samples_per_prompt=3)
    assert (one["samples_per_prompt"], three["samples_per_prompt"]) == (1, 3)
    assert three["count"] == three["fid"]["settings"]["num_samples"] == 12
    assert three["shapes_per_repeat"][0] == one["shapes_per_repeat"][0]
    assert three["metrics"]["val/fid"] == pytest.approx(one["metrics"]["val/fid"])
    for c in (*CATEGORIES, "overall"):
        mean = sum(r[c] for r in three["shapes_per_repeat"]) / 3
        assert three["metrics"][f"val/shapes/{c}"] == pytest.approx(mean)
    assert Evaluation(samples_per_prompt=2, final_samples_per_prompt=4, every_n_validations=3).images_sampled(7) \
        == len(ShapesPrompts()) * (4 + 2 * 2)


@pytest.mark.parametrize("evaluation, message", [
    ({"samples_per_prompt": 0}, "samples_per_prompt: must be an int >= 1"),
    ({"clip_model": "no-such-clip"}, "no-such-clip"),
    ({"fid_extractor": "inception-v3-compat", "fid_weights": "/nonexistent/pt_inception.pth"}, "weights_path"),
    ({"fid_extractor": "vgg"}, "extractor"),
    ({"prompts": {"class_path": "mos_lightning.evaluation.prompts.MJHQPrompts",
                  "init_args": {"root": "/nonexistent/mjhq"}}}, "MJHQ-30K"),
])
def test_bad_evaluation_settings_fail_before_training(tmp_path, capsys, evaluation, message):
    with pytest.raises(SystemExit) as stop:
        _fit(tmp_path, evaluation)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing trained


def test_mjhq_reference_smaller_than_requested(tmp_path):
    from PIL import Image

    meta = {f"im{k}": {"category": "people", "prompt": f"a person {k}"} for k in range(3)}
    (tmp_path / "people").mkdir()
    for k in meta:
        Image.new("RGB", (40, 40), (10 * len(k), 20, 30)).save(tmp_path / "people" / f"{k}.jpg")
    (tmp_path / "meta_data.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="count: 5 requested but .* holds only 3"):
        MJHQPrompts(str(tmp_path), count=5)
    built = MJHQPrompts(str(tmp_path), count=3, resolution=32).build((32, 32))
    assert built.captions == ["a person 0", "a person 1", "a person 2"] and built.categories == ["people"] * 3
