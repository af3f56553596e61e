"""A real 2-process Lightning DDP run on CPU (gloo) with resolution buckets, through the CLI, every arm."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mos_lightning.data import BucketedShapesDataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two processes, three arms
def test_two_process_ddp_fit_with_buckets_every_arm(tmp_path):
    from test_resume import BUCKETS, sample_key

    record = tmp_path / "batches.jsonl"
    recorder = {"class_path": "test_resume.BatchRecorder", "init_args": {"path": str(record)}}
    overlay = {"trainer": {"max_steps": 4, "val_check_interval": 4, "limit_val_batches": 1, "callbacks": [recorder],
                           "strategy": "ddp", "accelerator": "cpu", "devices": 2},
               "data": BUCKETS}
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(overlay))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "mos_lightning", "fit", "--config", str(ROOT / "experiments" / "router_inputs.yaml"),
           "--config", str(ROOT / "tests" / "tiny.yaml"), "--config", str(tmp_path / "ddp.yaml"),
           f"--trainer.logger.init_args.save_dir={tmp_path}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [[json.loads(line) for line in Path(p).read_text().splitlines()] for p in (record, f"{record}.rank1")]
    # The train set's samples by (caption, pixels), rendered here independently of the run: captions repeat in
    # the shapes domain, so disjointness is checked on sample indices, not on captions.
    train = BucketedShapesDataset(**BUCKETS["init_args"]["train"]["init_args"])
    index = {sample_key(*train[i][:2]): i for i in range(len(train))}
    assert len(index) == len(train), "two train samples share caption and pixels: keys would not identify them"
    arms = ["prompt", "prompt_latent", "prompt_latent_timestep"]
    for arm in arms:
        r0, r1 = ([r for r in rows if r["arm"] == arm] for rows in ranks)
        assert [r["step"] for r in r0] == [r["step"] for r in r1] == list(range(4))
        unknown = [k for r in r0 + r1 for k in r["samples"] if k not in index]
        assert not unknown, f"{arm}: trained on samples that are not the train set's: {unknown[:2]}"
        drawn = {}  # epoch -> every index drawn on either rank
        for a, b in zip(r0, r1):
            assert a["shape"] == b["shape"] and a["epoch"] == b["epoch"]  # lock-step: one bucket shape per step
            i0, i1 = ([index[k] for k in r["samples"]] for r in (a, b))
            assert len(i0) == len(i1) == 4  # full batches
            assert not set(i0) & set(i1), f"{arm} step {a['step']}: both ranks drew samples {set(i0) & set(i1)}"
            drawn.setdefault(a["epoch"], []).extend(i0 + i1)
        for epoch, indices in drawn.items():  # a shard per rank: no sample twice in an epoch, on any rank
            assert len(indices) == len(set(indices)), f"{arm} epoch {epoch}: a sample was drawn twice"
    table = (tmp_path / "router_inputs" / "results.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table.splitlines()[2:]}
    assert set(rows) == set(arms) and all(float(v) > 0 for v in rows.values())  # val/loss from the full val set
    assert done.stdout.count("| prompt_latent_timestep") == 1  # rank 0 alone prints the table
