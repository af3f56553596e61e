"""The README's main command under a stopwatch: wall time, peak RSS, learning per arm, and the quality bars.

python benchmarks/main_command.py [--config experiments/router_inputs.yaml] [--workdir DIR] [--bar main|quality]

Runs `python -m mos_lightning fit --config ...` in a child process (as a user would), then
reads the table the run wrote: wall time against the run's own prediction, peak RSS, and per arm
the val loss against its step-0 value, the evaluation's share of the time, and whether ShapesEval
meets the bar (issue 15: the main command within 10 minutes, the quality study within 60, on the
reference CPU). On a machine whose matmul rate differs from the reference's floor, the wall time is
also given scaled to that floor (a step is mostly matmuls; an estimate, and said to be one).
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import header

ROOT = Path(__file__).resolve().parents[1]
# ShapesEval bars and wall-time budgets on the reference CPU (2 cores, native bf16, bf16 matmul >= 350 GFLOP/s)
BARS = {"main": {"val/shapes/overall": 0.30, "val/shapes/single_object": 0.6},
        "quality": {"val/shapes/overall": 0.5, "val/shapes/single_object": 0.8}}
BUDGET_MIN = {"main": 10, "quality": 60}
REFERENCE_GFLOPS = 350.0


def seconds_logged(run: Path, tag: str) -> float:
    """Sum of a timing scalar over the run (the evaluation callbacks log their own cost); 0 without the run."""
    if not run.is_dir():
        return 0.0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    return sum(e.value for e in events.Scalars(tag)) if tag in events.Tags()["scalars"] else 0.0


def check_bar(row: dict, bar: str) -> bool:
    """Print the arm's ShapesEval against the bar; True when every threshold is met."""
    met = True
    for metric, threshold in BARS[bar].items():
        value = row.get(metric)
        ok = value not in (None, "") and float(value) >= threshold
        met &= ok
        shown = "not logged" if value in (None, "") else f"{float(value):.3f}"
        print(f"  {'':<24} bar {metric} {shown} >= {threshold}: {'met' if ok else 'NOT met'}")
    return met


def scaled_minutes(wall_s: float, log_lines: list[str]) -> str:
    """The reference CPU's expected wall time, from the matmul rate `fit` measured, when it printed it.

    A range: a step bound by matmuls scales with the rate (one end), a step bound by per-op overhead does not (the
    other end, this wall time). The embedded default's small matmuls sit near the overhead end."""
    for line in log_lines:
        match = re.search(r"(bfloat16|float32) matmul ([0-9.]+) GFLOP/s", line)
        if match:
            rate = float(match.group(2))
            scaled = wall_s / 60 * rate / REFERENCE_GFLOPS
            low, high = sorted((wall_s / 60, scaled))
            return (f"{low:.2f}-{high:.2f} min expected on a {REFERENCE_GFLOPS:.0f} GFLOP/s reference (this machine: "
                    f"{rate:.0f} GFLOP/s {match.group(1)}; rate-scaled at one end, unscaled at the other)")
    return "no matmul rate in the log: not scaled"


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
    parser.add_argument("--bar", choices=sorted(BARS), default=None,
                        help="which quality bar to print (default: quality for experiments/quality.yaml, else main)")
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
    bar = args.bar or ("quality" if Path(args.config).stem == "quality" else "main")
    lines = (workdir / "fit.log").read_text().splitlines()
    print(f"wall {wall / 60:.2f} min (budget {BUDGET_MIN[bar]} min on the reference CPU; "
          f"{scaled_minutes(wall, lines)})   peak RSS {peak_gb:.2f} GB (budget 4 GB)")
    for line in lines:  # what the run itself predicted and measured
        if line.startswith(("precision:", "machine:", "predicted wall time:", "wall time:")):
            print(f"  fit printed: {line}")
    met = []
    for folder in workdir.glob("runs/*/"):
        table = folder / "results_runs.csv" if (folder / "results_runs.csv").is_file() else folder / "results.csv"
        if not table.is_file():
            continue
        with open(table) as f:
            for row in csv.DictReader(f):
                seed = f"/seed{row['seed']}" if row.get("seed") else ""
                name = f"{row['arm']}{seed}"  # events sit under the logger's name, which may differ
                run = next((r for r in [folder / name, *workdir.glob(f"runs/*/{name}")] if r.is_dir()), folder / name)
                report(row, run)
                met.append(check_bar(row, bar))
    print(f"quality bar ({bar}): {'met by every arm' if met and all(met) else 'NOT met by every arm'}")
    raise SystemExit(code)


if __name__ == "__main__":
    main()
