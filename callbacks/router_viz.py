"""Router figures in TensorBoard at every validation (App. B.7, Fig. 14), for fixed prompts and a fixed seed."""
from __future__ import annotations

import time
from typing import Sequence

import lightning as L

from mos_lightning.analysis.figures import trace_figures, trajectory_strip
from mos_lightning.analysis.routing import summary_scalars
from mos_lightning.analysis.trace import trace

from .samples import images_size

DEFAULT_PROMPTS = ("a red circle to the left of a blue square", "two purple circles")


class RouterFigures(L.Callback):
    """Generates `prompts` with the routing recorded and logs, under `router/`:

    figures `contribution` (per-step layer contribution), `tokens` (per-token routing at
    `token_step`), `affinity` (m x n), `selection_frequency`, `entropy`; the image `trajectory`
    (the denoising strip); scalars `router/entropy`, `router/sparsity`, `router/selection_freq/layer_{i}`.
    Fusion strategies that return no Routing (all but MoS) are skipped quietly.

    Args:
        prompts: fixed captions; the same for every arm so figures compare side by side.
        seed: noise seed for the sampler.
        steps, cfg_scale: sampler settings; None takes the module's defaults.
        token_step: the step whose per-token routing is drawn; 0 is t = 1 as in Fig. 14, -1 the last.
    """

    def __init__(self, prompts: Sequence[str] = DEFAULT_PROMPTS, seed: int = 0, steps: int | None = None,
                 token_step: int = 0, cfg_scale: float | None = None):
        self.prompts, self.seed, self.steps = list(prompts), seed, steps
        self.token_step, self.cfg_scale = token_step, cfg_scale
        self._routes: bool | None = None  # unknown until one forward shows whether the fusion routes

    def routes(self, pl_module, image_size) -> bool:
        """Whether the module returns a Routing; one single-step sample of the prompts tells, once. (All of them:
        a batch of one would add a compiled graph of its own under `model.compile`.)"""
        if self._routes is None:
            self._routes = trace(pl_module, self.prompts, image_size, self.seed, steps=1).routes
        return self._routes

    def images_sampled(self, validations: int) -> int:
        """How many images a run with this many validations samples here (mos_lightning.budget)."""
        return len(self.prompts) * validations

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if trainer.sanity_checking or not hasattr(experiment, "add_figure"):
            return
        size = images_size(trainer)
        if not self.routes(pl_module, size):
            return
        start = time.perf_counter()
        result = trace(pl_module, self.prompts, size, self.seed, self.steps, self.cfg_scale)
        step = trainer.global_step
        for tag, figure in trace_figures(result, self.token_step, trajectory=False).items():
            experiment.add_figure(f"router/{tag}", figure, global_step=step)
        experiment.add_image("router/trajectory", trajectory_strip(result.frames), global_step=step)
        scalars = {**summary_scalars(result.routings), "router/seconds": time.perf_counter() - start}
        trainer.logger.log_metrics(scalars, step=step)  # router/seconds: read by benchmarks/main_command.py
