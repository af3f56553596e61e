"""Each image-caption source trains through the CLI on small local data; buckets never mix shapes."""
import json
import tarfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mos_lightning.cli import cli_main
from mos_lightning.data import FolderDataset, ImageCaptionDataModule

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(32, 48), (48, 32), (32, 32), (40, 56), (60, 36)]  # (H, W): wide, tall and square


def _image(rng, size) -> Image.Image:
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def make_folder(root: Path, rng, n: int = 20) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        _image(rng, SIZES[i % len(SIZES)]).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"a red circle number {i}")
    (root / "bad.jpg").write_bytes(b"not an image at all")  # corrupt: skipped and counted
    (root / "bad.txt").write_text("a broken file")
    return root


def fit(tmp_path, data: dict, *extra) -> list[dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    overlay = tmp_path / "data.yaml"
    overlay.write_text(yaml.safe_dump({"data": data}))
    return cli_main(["fit", "--config", str(ROOT / "experiments" / "router_inputs.yaml"), "--config",
                     str(ROOT / "tests" / "tiny.yaml"), "--config", str(overlay), "--arm", "prompt",
                     f"--trainer.logger.init_args.save_dir={tmp_path}", *extra])


def source(cls: str, **init_args) -> dict:
    return {"class_path": f"mos_lightning.data.{cls}", "init_args": init_args}


@pytest.fixture
def np_rng(rng):
    return np.random.default_rng(rng.initial_seed())


def test_buckets_never_mix_shapes(tmp_path, np_rng):
    folder = make_folder(tmp_path / "imgs", np_rng)
    data = ImageCaptionDataModule(FolderDataset(folder, image_size=32), batch_size=2, bucket_base=32, bucket_multiple=8)
    shapes = set()
    for batch in data.train_dataloader():
        assert batch.images.shape[0] == 2
        shapes.add(tuple(batch.images.shape[-2:]))
    assert len(shapes) >= 2 and shapes <= set(data.buckets)
    for i in range(len(data.train_set)):  # every index, so the corrupt file is surely visited
        image = data.train_set[i][0]
        assert tuple(image.shape[-2:]) == data.train_set.target_size(i)
    assert data.train_set.skipped["corrupt"] == 1


def test_folder_with_buckets_trains(tmp_path, np_rng, capsys):
    folder = make_folder(tmp_path / "imgs", np_rng)
    data = {"class_path": "mos_lightning.data.ImageCaptionDataModule",
            "init_args": {"train": source("FolderDataset", root=str(folder), image_size=32),
                          "val": source("FolderDataset", root=str(folder), image_size=32),
                          "batch_size": 2, "bucket_base": 32, "bucket_multiple": 8}}
    rows = fit(tmp_path, data)
    assert rows[0]["steps"] == 2 and rows[0]["val/loss"] > 0
    assert "data: train: skipped" in capsys.readouterr().err  # the run reports what it skipped


def test_manifest_and_mjhq_train(tmp_path, np_rng):
    make_folder(tmp_path / "imgs", np_rng, n=8)  # the images the manifest names
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("\n".join(json.dumps({"image": f"imgs/{i:03d}.png", "caption": f"a blue square {i}"})
                                  for i in range(8)) + "\n{broken\n")
    mjhq = tmp_path / "mjhq"
    meta = {}
    for i in range(6):
        category = ["animals", "people"][i % 2]
        (mjhq / category).mkdir(parents=True, exist_ok=True)
        _image(np_rng, (40, 40)).save(mjhq / category / f"id{i}.jpg")
        meta[f"id{i}"] = {"category": category, "prompt": f"a photo of thing {i}"}
    (mjhq / "meta_data.json").write_text(json.dumps(meta))
    for train in (source("ManifestDataset", manifest=str(manifest), image_size=32),
                  source("MJHQDataset", root=str(mjhq), image_size=32)):
        data = {"class_path": "mos_lightning.data.ImageCaptionDataModule",
                "init_args": {"train": train, "val": None, "batch_size": 2}}
        rows = fit(tmp_path / train["class_path"].rsplit(".", 1)[1], data, "--trainer.limit_val_batches=0")
        assert rows[0]["steps"] == 2


def test_shards_stream_and_train(tmp_path, np_rng):
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(8):
            for name, payload in ((f"{i:04d}.png", None), (f"{i:04d}.txt", f"a green cross {i}".encode())):
                if payload is None:
                    buffer = BytesIO()
                    _image(np_rng, (32, 32)).save(buffer, format="PNG")
                    payload = buffer.getvalue()
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, BytesIO(payload))
    data = {"class_path": "mos_lightning.data.ImageCaptionDataModule",
            "init_args": {"train": source("ShardDataset", urls=str(shard), image_size=32), "val": None,
                          "batch_size": 2}}
    rows = fit(tmp_path, data, "--trainer.limit_val_batches=0")
    assert rows[0]["steps"] == 2


def test_bucketed_shards_train_through_the_cli(tmp_path, np_rng):
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(24):
            buffer = BytesIO()
            _image(np_rng, SIZES[i % len(SIZES)]).save(buffer, format="PNG")
            for name, payload in ((f"{i:04d}.png", buffer.getvalue()), (f"{i:04d}.txt", f"a cross {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, BytesIO(payload))
    train = source("ShardDataset", urls=str(shard), image_size=32, batches_per_epoch=3)
    data = {"class_path": "mos_lightning.data.ImageCaptionDataModule",
            "init_args": {"train": train, "val": source("ShardDataset", urls=str(shard), image_size=32),
                          "batch_size": 2, "bucket_base": 32, "bucket_multiple": 8}}
    rows = fit(tmp_path, data, "--trainer.max_steps=5", "--trainer.val_check_interval=5")
    assert rows[0]["steps"] == 5 and rows[0]["val/loss"] > 0  # 3 batches an epoch: the stream restarted


def test_bucket_not_divisible_by_patch_is_a_clear_error(tmp_path, np_rng, capsys):
    folder = make_folder(tmp_path / "imgs", np_rng, n=4)
    data = {"class_path": "mos_lightning.data.ImageCaptionDataModule",
            "init_args": {"train": source("FolderDataset", root=str(folder), image_size=32), "val": None,
                          "batch_size": 2, "bucket_base": 30, "bucket_multiple": 6}}
    with pytest.raises(SystemExit) as stop:
        fit(tmp_path, data)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "data.bucket_multiple=6 is not a multiple of model.generation.patch_size" in err


@pytest.mark.slow  # the packaged base config's data: a 20000-sample bucketed set
def test_default_run_trains_on_several_aspect_ratios(tmp_path):
    from mos_lightning.cli import MoSCLI

    cli = MoSCLI(args=["--config", str(ROOT / "experiments" / "router_inputs.yaml"), "--trainer.logger=false"],
                 run=False)  # the packaged base config: the main command's data
    shapes = {tuple(batch.images.shape[-2:]) for _, batch in zip(range(12), cli.datamodule.train_dataloader())}
    assert shapes == {(24, 40), (32, 32), (40, 24)}
    data = yaml.safe_load((ROOT / "mos_lightning" / "configs" / "base.yaml").read_text())["data"]
    data["init_args"]["batch_size"] = 4
    data["init_args"]["val"]["init_args"]["length"] = 16
    rows = fit(tmp_path, data)
    assert rows[0]["steps"] == 2
