"""Save the router notebook's figures for one run as PNG files (for docs/), without Jupyter.

    python tools/router_figures.py RUN --out docs/figures/quality

RUN is a run folder (`runs/<experiment>/<arm>`) or a `.ckpt` in one, as the notebook's MOS_RUN. The prompts,
seed and sampler steps are the notebook's defaults; the figures are the same functions' output
(`mos_lightning.analysis.figures.trace_figures`), one file per figure, plus the summary scalars as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from mos_lightning.analysis import figures as F  # noqa: E402
from mos_lightning.analysis import routing as R  # noqa: E402
from mos_lightning.analysis.runs import load_run  # noqa: E402
from mos_lightning.analysis.trace import trace  # noqa: E402

PROMPTS = ["a red circle to the left of a blue square", "two purple circles"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=8, help="sampler steps traced (the notebook's SAMPLE_STEPS)")
    parser.add_argument("--token-step", type=int, default=0, help="the step whose per-token routing is drawn")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = trace(load_run(args.run), PROMPTS, (32, 32), 0, args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, figure in F.trace_figures(result, args.token_step).items():
        figure.savefig(args.out / f"{name}.png", dpi=110, bbox_inches="tight")
        print(args.out / f"{name}.png")
    summary = {k: float(v) for k, v in R.summary_scalars(result.routings).items()}
    (args.out / "summary.json").write_text(json.dumps({"run": str(args.run), "prompts": PROMPTS, **summary},
                                                      indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
