"""`python -m mos_lightning table runs/<experiment>`: the ablation table rebuilt from event files.

Each run logs its row as JSON text (results.ROW_TAG); this reads the newest one per run, orders the runs
by when they started, and prints the same Markdown the end of `fit` printed: with several seeds the rows
carry arm and seed, and the summary groups them by arm (results.summarize, as `fit` does), checked against
the experiment.paper block saved in the runs' config.yaml. Runs made at different times, or several
experiment folders, compare in one table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from ..errors import ConfigError
from ..results import ROW_TAG, check_paper, ordered, report, several_seeds, write_table


def _event_dirs(root: Path) -> list[Path]:
    return sorted({p.parent for p in root.rglob("events.out.tfevents.*")})


def read_row(run: Path) -> tuple[float, dict] | None:
    """(start wall time, row) of one run directory, or None when it logged no row (unfinished run)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"tensors": 0})
    events.Reload()
    tag = ROW_TAG + "/text_summary"
    if tag not in events.Tags().get("tensors", []):
        return None
    rows = events.Tensors(tag)
    text = rows[-1].tensor_proto.string_val[0].decode()
    return events.FirstEventTimestamp(), ordered(json.loads(text))


def latest_per_seed(rows: list[dict]) -> list[dict]:
    """One run per (arm, seed), the latest: a re-run of a seed (or a one-seed run at <arm>/ beside
    <arm>/seed0) replaces the earlier one rather than counting twice in the mean."""
    latest: dict[tuple, dict] = {}
    for row in rows:
        latest.pop((row["arm"], row.get("seed")), None)
        latest[(row["arm"], row.get("seed"))] = row
    if len(latest) < len(rows):
        print(f"table: {len(rows) - len(latest)} earlier run(s) of the same arm and seed left out", file=sys.stderr)
    return list(latest.values())


def rebuild(roots: list[Path]) -> list[dict]:
    found = []
    for root in roots:
        if not root.is_dir():
            raise ConfigError(f"table: {str(root)!r} is not a directory (pass runs/<experiment> folders)")
        found += [r for r in map(read_row, _event_dirs(root)) if r is not None]
    if not found:
        raise ConfigError(f"table: no finished arm (no {ROW_TAG!r} text) under {', '.join(map(str, roots))}")
    rows = [row for _, row in sorted(found, key=lambda r: r[0])]
    return latest_per_seed(rows) if several_seeds(rows) else rows


def _saved_paper(run: Path) -> dict | None:
    config = run / "config.yaml"  # LightningCLI's copy of the run's whole config
    if not config.is_file():
        return None
    return ((yaml.safe_load(config.read_text()) or {}).get("experiment") or {}).get("paper")


def read_paper(roots: list[Path]) -> dict | None:
    """The experiment.paper block the runs were trained with; None when none or when the folders disagree."""
    blocks = {}
    for run in (run for root in roots for run in _event_dirs(root)):
        paper = _saved_paper(run)
        if paper is not None:
            blocks[json.dumps(paper, sort_keys=True)] = paper
    if len(blocks) > 1:
        print("table: the runs hold different experiment.paper blocks; the paper's direction is left out",
              file=sys.stderr)
        return None
    paper = next(iter(blocks.values()), None)
    check_paper(paper)
    return paper


def table_main(args: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="python -m mos_lightning table", description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="runs/<experiment> folders (arms are found inside)")
    parser.add_argument("--write", type=Path, default=None,
                        help="also write results.md/.csv (and results_runs.csv with several seeds) into this folder")
    opts = parser.parse_args(args)
    rows = rebuild(opts.runs)
    paper = read_paper(opts.runs)
    if opts.write is not None:
        return write_table(rows, opts.write, paper)
    table = report(rows, paper)
    print(table)
    return table
