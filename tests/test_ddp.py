"""A real 2-process Lightning DDP run on CPU (gloo) with resolution buckets, through the CLI, every arm."""
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_two_process_ddp_fit_with_buckets_every_arm(tmp_path):
    from test_resume import BUCKETS

    record = tmp_path / "batches.jsonl"
    overlay = {"trainer": {"max_steps": 4, "val_check_interval": 4, "limit_val_batches": 1,
                           "callbacks": [{"class_path": "test_resume.BatchRecorder", "init_args": {"path": str(record)}}],
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
    arms = ["prompt", "prompt_latent", "prompt_latent_timestep"]
    for arm in arms:
        r0, r1 = ([r for r in rows if r["arm"] == arm] for rows in ranks)
        assert [r["step"] for r in r0] == [r["step"] for r in r1] == list(range(4))
        for a, b in zip(r0, r1):
            assert a["shape"] == b["shape"]  # lock-step: one bucket shape per step on every rank
            assert len(a["captions"]) == len(b["captions"]) == 4  # full batches
            assert not set(a["captions"]) & set(b["captions"]) or a["captions"] != b["captions"]
        seen0 = [c for r in r0 for c in r["captions"]]
        seen1 = [c for r in r1 for c in r["captions"]]
        assert seen0 != seen1  # the ranks drew different samples
    table = (tmp_path / "router_inputs" / "results.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table.splitlines()[2:]}
    assert set(rows) == set(arms) and all(float(v) > 0 for v in rows.values())  # val/loss from the full val set
    assert done.stdout.count("| prompt_latent_timestep") == 1  # rank 0 alone prints the table
