"""The end-of-ablation table: one row per arm, printed and written as Markdown and CSV."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from torch.utils.tensorboard.summary import hparams

from .data.shapes import CATEGORIES


def _number(value):
    return float(value) if hasattr(value, "item") or isinstance(value, (int, float)) else value


# The paper's tables lead with FID and CLIP; ShapesEval is this kit's exact alignment score.
LEAD = ("val/fid", "val/clip", "val/shapes/overall", *(f"val/shapes/{c}" for c in CATEGORIES), "val/loss",
        "val/loss@0")  # ShapesEval categories in GenEval's table order
TAIL = ("trainable_params", "cache_hit_rate", "steps", "predicted_s", "wall_s")
ROW_TAG = "table/row"  # each arm's row, as JSON text in its own event files: `table` rebuilds from it


def ordered(row: dict) -> dict:
    """One column order for printed and rebuilt tables: arm, LEAD, the other metrics sorted, TAIL."""
    middle = sorted(k for k in row if k not in LEAD + TAIL + ("arm",))
    keys = [k for k in LEAD if k in row] + middle + [k for k in TAIL if k in row]
    return {"arm": row["arm"], **{k: row[k] for k in keys}}


def arm_row(name: str, cli, predicted_s: float | None = None) -> dict:
    """What one finished arm reports: final metrics, its starting val loss, size, steps, predicted and actual
    time."""
    metrics = {k: _number(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    row = {"arm": name, "val/loss@0": cli.initial_val_loss}
    row.update({k: v for k, v in metrics.items() if "loss_t" not in k})
    row["trainable_params"] = cli.model.model.trainable_parameters()
    tower = cli.model.model.understanding
    if getattr(tower, "cache", None) is not None:  # how much of training the tower cache served
        row["cache_hit_rate"] = tower.cache_hits / max(tower.cache_hits + tower.cache_misses, 1)
    row["steps"] = cli.trainer.global_step
    if predicted_s is not None:
        row["predicted_s"] = round(predicted_s, 1)
    row["wall_s"] = round(cli.wall_time, 1)
    return ordered(row)


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


def _hparam(value):
    """HParams take numbers, strings and booleans; anything else (lists, class_path Namespaces) as JSON."""
    if isinstance(value, (int, float, str, bool)):
        return value
    plain = value.as_dict() if hasattr(value, "as_dict") else value  # jsonargparse Namespace
    return json.dumps(plain, default=str)


def arm_hparams(cli, name: str) -> dict:
    """What distinguishes this arm in TensorBoard's HParams dashboard: its overrides and the shared budget."""
    config = cli.config.fit
    overrides = (config.experiment.arms or {}).get(name) or {}
    params = {"experiment": config.experiment.name, "arm": name}
    for key in ("model.fusion.class_path", *overrides, "trainer.max_steps", "model.lr", "seed_everything"):
        value = config.get(key)
        if value is not None:
            params[key] = _hparam(value)
    data = config.get("data.init_args")
    if data is not None and data.get("batch_size") is not None:
        params["data.batch_size"] = data.get("batch_size")
    return params


def log_row(cli, name: str, row: dict) -> None:
    """The arm's row as JSON text (for `table`) and its hyper-parameters with the final metrics (HParams).

    HParams shows each metric's last logged value; the metrics named here are the scalars the run already logs
    (val/loss, val/fid, ...), so the dashboard and the curves agree.
    """
    logger = cli.trainer.logger
    if not cli.trainer.is_global_zero or not hasattr(getattr(logger, "experiment", None), "add_text"):
        return  # other ranks hold a dummy experiment
    writer = logger.experiment
    writer.add_text(ROW_TAG, json.dumps(row), global_step=cli.trainer.global_step)
    metrics = {k: v for k, v in row.items() if k.startswith("val/") and k != "val/loss@0" and v is not None}
    for summary in hparams(arm_hparams(cli, name), metrics):
        writer._get_file_writer().add_summary(summary)  # as Lightning's TensorBoardLogger does
    writer.flush()
