"""The end-of-ablation table: one row per arm, printed and written as Markdown and CSV.

With several seeds (`fit --seeds 0,1,2`) the table is one row per arm with each metric's mean ± sample std
over the seeds, the paper's direction checked against it (experiment.paper), and every run below it.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from torch.utils.tensorboard.summary import hparams

from .data.shapes import CATEGORIES
from .errors import ConfigError


def _number(value):
    return float(value) if hasattr(value, "item") or isinstance(value, (int, float)) else value


# The paper's tables lead with FID and CLIP; ShapesEval is this kit's exact alignment score.
LEAD = ("val/fid", "val/clip", "val/shapes/overall", *(f"val/shapes/{c}" for c in CATEGORIES), "val/loss",
        "val/loss@0")  # ShapesEval categories in GenEval's table order
TAIL = ("trainable_params", "cache_hit_rate", "steps", "predicted_s", "wall_s")
ROW_TAG = "table/row"  # each arm's row, as JSON text in its own event files: `table` rebuilds from it


def ordered(row: dict) -> dict:
    """One column order for printed and rebuilt tables: arm, seed, LEAD, the other metrics sorted, TAIL."""
    head = ("arm", "seed") if "seed" in row else ("arm",)  # rows logged before seeds have none
    middle = sorted(k for k in row if k not in LEAD + TAIL + head)
    keys = list(head) + [k for k in LEAD if k in row] + middle + [k for k in TAIL if k in row]
    return {k: row[k] for k in keys}


def arm_row(name: str, cli, predicted_s: float | None = None) -> dict:
    """What one finished arm reports: final metrics, its starting val loss, size, steps, predicted and actual
    time."""
    metrics = {k: _number(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    seed = cli.config.fit.get("seed_everything")  # the seed used: LightningCLI writes back a drawn one
    row = {"arm": name, "seed": seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
           "val/loss@0": cli.initial_val_loss}
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


@dataclass(frozen=True)
class Spread:
    """One metric over an arm's seeds: mean, sample standard deviation (ddof=1; None for one run), count."""

    mean: float
    std: float | None
    n: int

    @property
    def se(self) -> float | None:
        """Standard error of the mean."""
        return None if self.std is None else self.std / math.sqrt(self.n)


def spread(values) -> Spread:
    values = [float(v) for v in values]
    return Spread(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def several_seeds(rows: list[dict]) -> bool:
    """Whether some arm ran with two or more seeds: then the table is mean ± std per arm."""
    seeds: dict[str, set] = {}
    for row in rows:
        if row.get("seed") is not None:
            seeds.setdefault(row["arm"], set()).add(row["seed"])
    return any(len(s) > 1 for s in seeds.values())


def summarize(rows: list[dict]) -> list[dict]:
    """One row per arm, in the order the arms first ran: n runs, each val/ metric's Spread over them, and the
    other numbers (parameters, steps, seconds) as their mean, or as is where every run agrees."""
    runs: dict[str, list[dict]] = {}
    for row in rows:
        runs.setdefault(row["arm"], []).append(row)
    columns = [c for c in dict.fromkeys(k for row in rows for k in row) if c not in ("arm", "seed")]
    summary = []
    for arm, group in runs.items():
        out = {"arm": arm, "n": len(group)}
        for column in columns:
            values = [r[column] for r in group if _is_number(r.get(column))]
            if column.startswith("val/") and values:
                out[column] = spread(values)
            elif values:
                out[column] = values[0] if len(set(values)) == 1 else statistics.fmean(values)
        summary.append(out)
    return summary


def _cell(value, n: int | None = None) -> str:
    if isinstance(value, Spread):
        text = _cell(value.mean) if value.std is None else f"{_cell(value.mean)} ± {_cell(value.std)}"
        return text if value.n == n else f"{text} (n={value.n})"  # a metric some runs did not log
    if isinstance(value, float):
        return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)


def markdown(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c), row.get("n")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _csv_cells(row: dict) -> dict:
    """A summary row for CSV: each Spread as <metric>_mean and <metric>_std."""
    cells = {}
    for key, value in row.items():
        if isinstance(value, Spread):
            cells.update({f"{key}_mean": value.mean, f"{key}_std": value.std})
        else:
            cells[key] = value
    return cells


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)


def _without_seed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seed"} for row in rows]  # one seed: the table as before


DIRECTIONS = ("lower", "higher")


def check_paper(paper, arms=None) -> None:
    """experiment.paper = {best: ARM, metrics: {METRIC: lower|higher}}: the paper's winner and what it won on."""
    if paper is None:
        return
    where = "experiment.paper"
    if not isinstance(paper, dict) or set(paper) != {"best", "metrics"}:
        raise ConfigError(f"{where}: expected exactly the keys best (an arm) and metrics ({{metric: lower|higher}}), "
                          f"got {paper!r}")
    best = paper["best"]
    if not isinstance(best, str) or (arms is not None and best not in arms):
        allowed = "an arm's name" if arms is None else ", ".join(arms)
        raise ConfigError(f"{where}.best={best!r} is not an arm of the experiment; allowed: {allowed}")
    metrics = paper["metrics"]
    if not isinstance(metrics, dict) or not metrics:
        raise ConfigError(f"{where}.metrics: expected {{metric: lower|higher}}, at least one, got {metrics!r}")
    for metric, direction in metrics.items():
        if direction not in DIRECTIONS:
            raise ConfigError(f"{where}.metrics.{metric}={direction!r}: allowed lower or higher")


def verdict(summary: list[dict], best: str, metric: str, direction: str) -> str:
    """Whether the kit's mean points the paper's way: the paper's best arm against the best other arm, the
    difference in standard errors (difference / sqrt(se_a^2 + se_b^2), se = std / sqrt(n))."""
    rows = {row["arm"]: row for row in summary if isinstance(row.get(metric), Spread)}
    others = {arm: row[metric] for arm, row in rows.items() if arm != best}
    if not rows:
        return f"{metric}: skipped, not in the rows (no run logged it)"
    if best not in rows:
        return f"{metric}: skipped, the paper's best arm {best!r} did not run or log it"
    if not others:
        return f"{metric}: skipped, no other arm logged it"
    ours = rows[best][metric]
    sign = 1.0 if direction == "higher" else -1.0
    rival = max(others, key=lambda arm: sign * others[arm].mean)
    theirs = others[rival]
    margin = sign * (ours.mean - theirs.mean)  # > 0: the paper's best arm is better here too
    agrees = "same direction as the paper" if margin > 0 else "not the paper's direction"
    return (f"{metric} ({direction} is better): {best} vs {rival} (next best): {ours.mean:.4g} vs {theirs.mean:.4g}, "
            f"difference {ours.mean - theirs.mean:+.4g}, {_how_far(margin, ours, theirs)} — {agrees}")


def _how_far(margin: float, ours: Spread, theirs: Spread) -> str:
    """'better by 1.3 SE' / 'worse by 0.4 SE': the margin over the standard error of the difference."""
    if margin == 0:
        return "level"
    how = "better" if margin > 0 else "worse"
    if ours.se is None or theirs.se is None:
        return f"{how} (no SE: an arm has one run)"
    se = math.hypot(ours.se, theirs.se)
    return f"{how} by {abs(margin) / se:.1f} SE" if se > 0 else f"{how} (no spread: 0 SE)"


def paper_lines(summary: list[dict], paper) -> list[str]:
    if not paper:
        return []
    return [verdict(summary, paper["best"], metric, direction) for metric, direction in paper["metrics"].items()]


def report(rows: list[dict], paper=None) -> str:
    """The Markdown of results.md: the runs' table (one seed), or the summary per arm, the paper's direction
    and every run (several seeds)."""
    if not several_seeds(rows):
        return markdown(_without_seed(rows))
    summary = summarize(rows)
    parts = [markdown(summary)]
    lines = paper_lines(summary, paper)
    if lines:
        parts.append(f"Paper direction (experiment.paper: best {paper['best']}; mean over seeds, SE = std/sqrt(n)):\n"
                     + "\n".join(f"- {line}" for line in lines))
    parts.append("Runs, one per arm and seed (results_runs.csv):\n\n" + markdown(rows))
    return "\n\n".join(parts)


def write_table(rows: list[dict], directory: Path, paper=None) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    text = report(rows, paper)
    (directory / "results.md").write_text(text + "\n")
    if several_seeds(rows):
        _write_csv(directory / "results.csv", [_csv_cells(row) for row in summarize(rows)])
        _write_csv(directory / "results_runs.csv", rows)
        written = "results.md, results.csv (mean and std per arm) and results_runs.csv (every run)"
    else:
        _write_csv(directory / "results.csv", _without_seed(rows))
        (directory / "results_runs.csv").unlink(missing_ok=True)  # an earlier multi-seed fit's, now stale
        written = "results.md and results.csv"
    print(f"\n{text}\n\n(written to {directory}/{written})")
    return text


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
