"""A preempted fit (SIGTERM, or SIGUSR1 as SLURM sends before requeueing) saves a checkpoint, exits non-zero,
and `--ckpt_path last` continues to the same losses as the run that was never interrupted; a half-written
checkpoint is never picked."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mos_lightning.checkpoints import is_complete, newest_complete
from mos_lightning.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40


def _overlay(tmp_path: Path, record: Path) -> Path:
    callbacks = [{"class_path": "test_resume.BatchRecorder", "init_args": {"path": str(record)}}]
    # float32: losses are compared bit for bit between processes, which bf16 CPU kernels do not guarantee
    overlay = {"trainer": {"max_steps": STEPS, "val_check_interval": 1000, "limit_val_batches": 1,
                           "callbacks": callbacks, "precision": "32-true"},
               "model": {"understanding": {"init_args": {"dtype": "float32"}}}}
    path = tmp_path / f"overlay_{record.stem}.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return path


def _args(tmp_path: Path, name: str, *overlays: Path) -> list[str]:
    record = tmp_path / f"{name}.jsonl"
    configs = [a for path in overlays for a in ("--config", str(path))]
    return ["fit", "--config", str(ROOT / "experiments" / "router_inputs.yaml"), "--config",
            str(ROOT / "tests" / "tiny.yaml"), *configs, "--config", str(_overlay(tmp_path, record)), "--arm",
            "prompt", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"]


def _losses(path: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in map(json.loads, path.read_text().splitlines())}


def _preempt(tmp_path: Path, name: str, signum: int, *overlays: Path) -> subprocess.CompletedProcess:
    """A subprocess fit, sent `signum` once it has taken a few steps (rank 0 only, under several processes)."""
    path = os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=path)
    record = tmp_path / f"{name}.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "mos_lightning", *_args(tmp_path, name, *overlays)], env=env,
                            cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (record.exists() and len(record.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the fit took no steps in 300 s"
        time.sleep(0.05)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _saved_on_signal(done: subprocess.CompletedProcess, tmp_path: Path, signum: int) -> Path:
    """The checks every preempted fit passes: exit 128 + signum, one complete checkpoint named for its step,
    and the message; returns the checkpoint."""
    assert done.returncode == 128 + signum, done.stderr[-3000:]
    saved = list((tmp_path / "runs" / "router_inputs" / "prompt" / "checkpoints").glob("preempted-step=*.ckpt"))
    assert len(saved) == 1 and is_complete(saved[0])
    step = torch.load(saved[0], map_location="cpu", weights_only=True)["global_step"]
    assert 3 <= step < STEPS and saved[0].name == f"preempted-step={step}.ckpt"
    assert f"preempted by {signal.Signals(signum).name} after step {step}" in done.stderr
    return saved[0]


def test_sigusr1_saves_a_checkpoint_and_exits_non_zero(tmp_path):
    """SLURM's warning before requeueing; SIGTERM is test_resume_from_last_continues_exactly's signal."""
    _saved_on_signal(_preempt(tmp_path, "preempted", signal.SIGUSR1), tmp_path, signal.SIGUSR1)


def test_resume_from_last_continues_exactly(tmp_path):
    (tmp_path / "full").mkdir()
    cli_main(_args(tmp_path / "full", "full"))
    full = _losses(tmp_path / "full" / "full.jsonl")
    saved = _saved_on_signal(_preempt(tmp_path, "first", signal.SIGTERM), tmp_path, signal.SIGTERM)
    half = saved.parent / "zz-killed.ckpt"  # what a save killed half-way leaves, and newer than the good one
    half.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    cli_main([*_args(tmp_path, "resumed"), "--ckpt_path", "last"])
    first, resumed = _losses(tmp_path / "first.jsonl"), _losses(tmp_path / "resumed.jsonl")
    step = min(resumed)
    assert step == torch.load(saved, map_location="cpu", weights_only=True)["global_step"]
    assert sorted(resumed) == list(range(step, STEPS))
    assert {s: first[s] for s in range(step)} == {s: full[s] for s in range(step)}
    assert resumed == {s: full[s] for s in range(step, STEPS)}  # bit for bit, every step after the signal


def test_last_with_nothing_saved_starts_from_step_zero(tmp_path, capsys):
    cli_main([*_args(tmp_path, "fresh"), "--ckpt_path", "last", "--trainer.max_steps", "2"])
    assert "no complete checkpoint" in capsys.readouterr().err
    assert sorted(_losses(tmp_path / "fresh.jsonl")) == [0, 1]


def test_newest_complete_skips_a_truncated_file(tmp_path, rng):
    older, newer = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    torch.save({"w": torch.randn(64, 64, generator=rng)}, older)
    torch.save({"w": torch.randn(64, 64, generator=rng)}, newer)
    os.utime(newer, (time.time() + 2, time.time() + 2))  # two saves in one mtime tick would tie (a CI flake)
    assert newest_complete(tmp_path) == (newer, [])
    newer.write_bytes(newer.read_bytes()[:-100])
    os.utime(newer, (time.time() + 5, time.time() + 5))
    assert not is_complete(newer) and is_complete(older)
    assert newest_complete(tmp_path) == (older, [newer])
    (tmp_path / "c.ckpt").write_bytes(b"not a checkpoint")
    assert newest_complete(tmp_path)[0] == older


SAVER = """
import sys, time, torch
import torch.distributed.checkpoint as dcp
kind, path = sys.argv[1], sys.argv[2]
state = {f"w{i}": torch.randn(1024, 1024) for i in range(64)}  # 256 MB: the write takes a while
print("writing", flush=True)
if kind == "file":
    torch.save(state, path)
else:
    dcp.save(state, checkpoint_id=path)
"""


@pytest.mark.slow  # two subprocesses writing 256 MB each
@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_save_killed_half_way_is_never_picked(tmp_path, kind):
    """SIGKILL a process while it writes a checkpoint (torch.save, or torch.distributed.checkpoint's folder):
    newest_complete passes over what it left and takes the older complete one."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    older = folder / "step=1.ckpt"
    torch.save({"w": torch.randn(8, 8)}, older)
    target = folder / "step=2.ckpt"
    saver = subprocess.Popen([sys.executable, "-c", SAVER, kind, str(target)], stdout=subprocess.PIPE, text=True)
    assert saver.stdout.readline().strip() == "writing"
    deadline = time.time() + 120
    while time.time() < deadline and not _bytes_written(target):
        time.sleep(0.005)
    saver.kill()
    saver.wait()
    assert _bytes_written(target), "the saver was killed before it wrote anything: nothing was tested"
    assert not is_complete(target)
    assert newest_complete(folder) == (older, [target])


def _bytes_written(path: Path) -> int:
    """Bytes in the file, or in the files under the folder. Not a folder's own st_size: DCP creates the folder
    before its first shard, and counting that made the test kill the saver before it had written anything."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0
