"""`python -m mos_lightning table runs/<experiment>`: the ablation table rebuilt from event files.

Each arm's run logs its row as JSON text (results.ROW_TAG); this reads the newest one per run, orders the
arms by when they started, and prints the same Markdown the end of `fit` printed. Runs made at different
times, or several experiment folders, compare in one table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ConfigError
from ..results import ROW_TAG, markdown, ordered, write_table


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


def rebuild(roots: list[Path]) -> list[dict]:
    found = []
    for root in roots:
        if not root.is_dir():
            raise ConfigError(f"table: {str(root)!r} is not a directory (pass runs/<experiment> folders)")
        found += [r for r in map(read_row, _event_dirs(root)) if r is not None]
    if not found:
        raise ConfigError(f"table: no finished arm (no {ROW_TAG!r} text) under {', '.join(map(str, roots))}")
    return [row for _, row in sorted(found, key=lambda r: r[0])]


def table_main(args: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="python -m mos_lightning table", description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="runs/<experiment> folders (arms are found inside)")
    parser.add_argument("--write", type=Path, default=None, help="also write results.md/.csv into this folder")
    opts = parser.parse_args(args)
    rows = rebuild(opts.runs)
    if opts.write is not None:
        return write_table(rows, opts.write)
    table = markdown(rows)
    print(table)
    return table
