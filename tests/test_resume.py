"""`fit --ckpt_path` from a mid-epoch checkpoint continues exactly as the uninterrupted run: same batches
(the sampler's position is in the checkpoint) and same losses (training randomness is keyed by step)."""
import hashlib
import json
from pathlib import Path

import lightning as L
import pytest
import yaml

from mos_lightning.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]


def sample_key(image, caption: str) -> str:
    """What tells one sample from another: its caption and its pixels. Captions alone repeat (the shapes
    domain draws "a cross" for many samples), and the batch does not carry dataset indices."""
    pixels = image.detach().to("cpu", dtype=image.dtype).contiguous().numpy().tobytes()
    return f"{caption}|{hashlib.sha1(pixels).hexdigest()}"


class BatchRecorder(L.Callback):
    """Appends (step, epoch, captions, sample keys, shape, loss) of every training batch to a JSONL file;
    ranks > 0 to .rankN."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        row = {"step": trainer.global_step - 1, "epoch": trainer.current_epoch, "captions": batch.captions,
               "samples": [sample_key(image, caption) for image, caption in zip(batch.images, batch.captions)],
               "shape": list(batch.images.shape[-2:]), "loss": float(outputs["loss"]),
               "arm": trainer.logger.version if trainer.logger else None}
        rank = trainer.global_rank
        with open(self.path + (f".rank{rank}" if rank else ""), "a") as f:
            f.write(json.dumps(row) + "\n")


def _overlay(tmp_path: Path, record: Path, data: dict | None) -> Path:
    callbacks = [{"class_path": "test_resume.BatchRecorder", "init_args": {"path": str(record)}},
                 {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"every_n_train_steps": 5, "save_top_k": -1, "filename": "{step}"}}]
    overlay = {"trainer": {"max_steps": 12, "val_check_interval": 100, "callbacks": callbacks,
                           "limit_val_batches": 1}}
    if data is not None:
        overlay["data"] = data
    path = tmp_path / f"overlay_{record.stem}.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return path


def _fit(tmp_path: Path, record: Path, data: dict | None, *extra: str):
    args = ["fit", "--config", str(ROOT / "experiments" / "router_inputs.yaml"), "--config",
            str(ROOT / "tests" / "tiny.yaml"), "--config", str(_overlay(tmp_path, record, data)), "--arm", "prompt",
            f"--trainer.logger.init_args.save_dir={tmp_path / record.stem}", *extra]
    cli_main(args)
    return [json.loads(line) for line in record.read_text().splitlines()]


SHAPES = {"class_path": "mos_lightning.data.ShapesDataModule",
          "init_args": {"batch_size": 4, "train_size": 32, "val_size": 8}}  # 8 batches an epoch
BUCKETS = {"class_path": "mos_lightning.data.ImageCaptionDataModule",
           "init_args": {"train": {"class_path": "mos_lightning.data.BucketedShapesDataset",
                                   "init_args": {"length": 48, "seed": 5, "base": 32, "multiple": 8}},
                         "val": {"class_path": "mos_lightning.data.BucketedShapesDataset",
                                 "init_args": {"length": 8, "seed": 9, "base": 32, "multiple": 8}},
                         "batch_size": 4, "bucket_base": 32, "bucket_multiple": 8}}


@pytest.mark.slow  # two 12-step fits and two resumes
@pytest.mark.parametrize("data", [SHAPES, BUCKETS], ids=["shapes", "buckets"])
def test_resume_mid_epoch_sees_the_uninterrupted_batches_and_losses(tmp_path, data):
    full = _fit(tmp_path, tmp_path / "full.jsonl", data)
    assert [r["step"] for r in full] == list(range(12))
    assert len({r["epoch"] for r in full}) >= 2  # the run crosses an epoch boundary
    ckpt = next((tmp_path / "full" / "router_inputs" / "prompt" / "checkpoints").glob("step=5.ckpt"))
    resumed = _fit(tmp_path, tmp_path / "resumed.jsonl", data, f"--ckpt_path={ckpt}")
    assert [r["step"] for r in resumed] == list(range(5, 12))
    for got, want in zip(resumed, full[5:]):
        assert (got["captions"], got["shape"], got["epoch"]) == (want["captions"], want["shape"], want["epoch"])
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6)
    if data is BUCKETS:
        assert len({tuple(r["shape"]) for r in full}) > 1  # several bucket shapes were trained


def test_ckpt_path_over_several_arms_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli_main(["fit", "--config", str(ROOT / "experiments" / "router_inputs.yaml"), "--ckpt_path=x.ckpt"])
    assert stop.value.code == 2 and "--ckpt_path resumes one arm; add --arm NAME" in capsys.readouterr().err


class OptimizerStateCheck(L.Callback):
    """Records, after training, the trainable parameters the optimiser holds no state for."""

    missing: dict[str, list[str]] = {}

    def on_train_end(self, trainer, pl_module):
        state = trainer.optimizers[0].state
        OptimizerStateCheck.missing[trainer.logger.version] = [
            n for n, p in pl_module.named_parameters() if p.requires_grad and p not in state]


def test_every_trainable_parameter_has_optimizer_state(tmp_path):
    """A sharded checkpoint's load asks for a state per parameter: cross-attention leaves the blocks' context
    norms idle, and they must still get one (a zero gradient), or FSDP2 resume fails."""
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"max_steps": 1, "limit_val_batches": 0, "callbacks": [
        {"class_path": "test_resume.OptimizerStateCheck"}]}}))
    cli_main(["fit", "--config", str(ROOT / "experiments" / "fusion.yaml"), "--config",
              str(ROOT / "tests" / "tiny.yaml"), "--config", str(overlay),
              f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert sorted(OptimizerStateCheck.missing) == ["cross_attn", "mos", "self_attn"]
    assert all(names == [] for names in OptimizerStateCheck.missing.values()), OptimizerStateCheck.missing
