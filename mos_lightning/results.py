"""The end-of-ablation table: one row per arm, printed and written as Markdown and CSV."""
from __future__ import annotations

import csv
from pathlib import Path


def _number(value):
    return float(value) if hasattr(value, "item") or isinstance(value, (int, float)) else value


def arm_row(name: str, cli) -> dict:
    """What one finished arm reports: final metrics, its starting val loss, size, steps, time."""
    metrics = {k: _number(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    row = {"arm": name, "val/loss": metrics.pop("val/loss", None), "val/loss@0": cli.initial_val_loss}
    row.update({k: v for k, v in sorted(metrics.items()) if "loss_t" not in k})
    row["trainable_params"] = cli.model.model.trainable_parameters()
    tower = cli.model.model.understanding
    if getattr(tower, "cache", None) is not None:  # how much of training the tower cache served
        row["cache_hit_rate"] = tower.cache_hits / max(tower.cache_hits + tower.cache_misses, 1)
    row["steps"] = cli.trainer.global_step
    row["wall_s"] = round(cli.wall_time, 1)
    return row


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)


def markdown(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_table(rows: list[dict], directory: Path) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    (directory / "results.md").write_text(table + "\n")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(directory / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    print(f"\n{table}\n\n(written to {directory}/results.md and results.csv)")
    return table
