"""Sample grids in TensorBoard at every validation, for fixed prompts and a fixed seed."""
from __future__ import annotations

from typing import Sequence

import lightning as L
import torch
from torchvision.utils import make_grid

DEFAULT_PROMPTS = (
    "a red circle", "a blue square", "a green triangle", "a yellow square",
    "two purple circles", "three white triangles", "a red circle to the left of a blue square",
    "a green square above a yellow circle",
)


class SampleGrid(L.Callback):
    """Generates `prompts` with the module's sampler and logs one grid image per validation.

    Args:
        prompts: fixed captions; the same for every arm so grids compare side by side.
        seed: noise seed for the sampler.
        steps, cfg_scale: sampler settings; None takes the module's defaults.
    """

    def __init__(self, prompts: Sequence[str] = DEFAULT_PROMPTS, seed: int = 0, steps: int | None = None,
                 cfg_scale: float | None = None, nrow: int = 4):
        self.prompts, self.seed, self.steps, self.cfg_scale, self.nrow = list(prompts), seed, steps, cfg_scale, nrow

    def grid(self, pl_module, image_size) -> torch.Tensor:
        images = pl_module.generate(self.prompts, tuple(image_size), seed=self.seed, steps=self.steps,
                                    cfg_scale=self.cfg_scale)
        return make_grid((images.float().cpu() + 1) / 2, nrow=self.nrow, padding=1)  # (3, H', W') in [0, 1]

    def images_sampled(self, validations: int) -> int:
        """How many images a run with this many validations samples here (mos_lightning.budget)."""
        return len(self.prompts) * validations

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if trainer.sanity_checking or not hasattr(experiment, "add_image"):
            return
        size = images_size(trainer)
        experiment.add_image("samples", self.grid(pl_module, size), global_step=trainer.global_step)


def images_size(trainer: L.Trainer) -> tuple[int, int]:
    """The (H, W) the callbacks generate at: the DataModule's image_size (its base bucket), else 32 x 32."""
    return tuple(getattr(trainer.datamodule, "image_size", None) or (32, 32))
