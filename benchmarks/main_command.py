"""The README's main command under a stopwatch: wall time, peak RSS, and learning per arm.

python benchmarks/main_command.py [--config experiments/router_inputs.yaml] [--workdir DIR]

Runs `python -m mos_lightning fit --config ...` in a child process (as a user would), then
reads the table the run wrote: wall time against the run's own prediction, peak RSS, and per arm
the val loss against its step-0 value and the evaluation's share of the time.
"""
from __future__ import annotations

import argparse
import csv
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import header

ROOT = Path(__file__).resolve().parents[1]


def seconds_logged(run: Path, tag: str) -> float:
    """Sum of a timing scalar over the run (the evaluation callbacks log their own cost)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    return sum(e.value for e in events.Scalars(tag)) if tag in events.Tags()["scalars"] else 0.0


def report(row: dict, run: Path) -> None:
    ratio = float(row["val/loss"]) / float(row["val/loss@0"])
    predicted = f" (predicted {float(row['predicted_s']):.0f} s)" if row.get("predicted_s") else ""
    print(f"  {row['arm']:<24} val/loss@0 {float(row['val/loss@0']):.4f} -> {float(row['val/loss']):.4f} "
          f"({ratio:.0%} of start)  steps {row['steps']}  wall {float(row['wall_s']):.0f} s{predicted}")
    scores = "  ".join(f"{k} {float(row[k]):.3f}" for k in ("val/fid", "val/clip", "val/shapes/overall") if row.get(k))
    if scores:
        print(f"  {'':<24} {scores}")
    cost = {tag: seconds_logged(run, tag) for tag in ("eval/seconds", "router/seconds")}
    if any(cost.values()):
        spent = sum(cost.values())
        print(f"  {'':<24} evaluation {cost['eval/seconds']:.1f} s + router figures {cost['router/seconds']:.1f} s "
              f"= {spent / (float(row['wall_s']) - spent):.1%} on top of the rest of the arm")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "experiments" / "router_inputs.yaml"))
    parser.add_argument("--workdir", default=None, help="where runs/ goes (default: a fresh temp dir)")
    args, extra = parser.parse_known_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mos_main_"))
    workdir.mkdir(parents=True, exist_ok=True)
    header()
    command = [sys.executable, "-m", "mos_lightning", "fit", "--config", str(Path(args.config).resolve()), *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    with open(workdir / "fit.log", "w") as log:
        code = subprocess.run(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux
    print(f"command: {' '.join(command[1:])}  (exit {code}, log {workdir / 'fit.log'})")
    print(f"wall {wall / 60:.2f} min   peak RSS {peak_gb:.2f} GB")
    for line in (workdir / "fit.log").read_text().splitlines():  # what the run itself predicted and measured
        if line.startswith(("precision:", "machine:", "predicted wall time:", "wall time:")):
            print(f"  fit printed: {line}")
    for table in workdir.glob("runs/*/results.csv"):
        with open(table) as f:
            for row in csv.DictReader(f):
                report(row, table.parent / row["arm"])
    raise SystemExit(code)


if __name__ == "__main__":
    main()
