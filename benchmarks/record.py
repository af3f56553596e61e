"""Run a benchmark and keep its output as a dated result file with everything needed to compare it.

python benchmarks/record.py main_command.py [benchmark args...]

Writes benchmarks/results/<benchmark>_<cpu>_<YYYY-MM-DD>.md (a suffix -2, -3... if taken): the command, git
commit (and whether the tree had uncommitted changes), package versions, CPU model and flags, the precision
`fit` chooses here, and the benchmark's whole output (which begins with its machine header).
"""
from __future__ import annotations

import datetime
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from mos_lightning.machine import choose_precision, describe_cpu

HERE = Path(__file__).resolve().parent
PACKAGES = ("torch", "lightning", "transformers", "torchmetrics", "open_clip_torch", "torch-fidelity", "jsonargparse")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=HERE).stdout.strip()


def versions(packages: tuple[str, ...] = PACKAGES) -> str:
    def one(name: str) -> str:
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            return f"{name} (not installed)"

    return ", ".join(map(one, packages)) + f", Python {sys.version.split()[0]}"


def result_path(benchmark: str, day: str) -> Path:
    cpu = re.sub(r"[^a-z0-9]+", "-", describe_cpu().split(" (")[0].lower()).strip("-")
    stem = f"{Path(benchmark).stem.replace('_', '-')}_{cpu}_{day}"
    path, n = HERE / "results" / f"{stem}.md", 1
    while path.exists():
        n += 1
        path = HERE / "results" / f"{stem}-{n}.md"
    return path


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    benchmark, args = sys.argv[1], sys.argv[2:]
    command = [sys.executable, str(HERE / benchmark), *args]
    started = datetime.datetime.now(datetime.timezone.utc)
    run = subprocess.run(command, capture_output=True, text=True, cwd=HERE)
    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
    precision, dtype, why = choose_precision("cpu")
    lines = [f"# {Path(benchmark).stem} on {started:%Y-%m-%d %H:%M} UTC", "",
             f"- command: `python benchmarks/{benchmark} {' '.join(args)}`".rstrip() + f" (exit {run.returncode})",
             f"- commit: {git('rev-parse', '--short', 'HEAD')}{dirty}", f"- packages: {versions()}",
             f"- CPU: {describe_cpu()}", f"- precision: {precision}, tower {dtype} ({why})", "", "```",
             run.stdout.rstrip(), "```", ""]
    path = result_path(benchmark, f"{started:%Y-%m-%d}")
    path.parent.mkdir(exist_ok=True)
    path.write_text("\n".join(lines))
    print(run.stdout, end="")
    print(f"written to {path.relative_to(HERE.parent)}", file=sys.stderr)
    if run.returncode:
        print(run.stderr[-3000:], file=sys.stderr)
    raise SystemExit(run.returncode)


if __name__ == "__main__":
    main()
