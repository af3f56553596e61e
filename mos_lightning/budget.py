"""The work of a `fit` command in FLOPs, and its wall time predicted from this machine's matmul rate.

A model forward is counted once, for one sample, by torch's FLOP counter (matmuls and attention); a training
step is 3x the forward (forward + backward's two matmuls per weight). A step reaches only a fraction of the
large-matmul peak (small matrices, softmax, norms, Python), so the prediction divides by `UTILISATION`.
What FLOPs do not show is added in seconds: the cold compile of the first arm (`model.compile`; later arms
reuse inductor's cache) and each arm's set-up. The constants come from benchmarks/main_command.py runs
(benchmarks/results/). Progress lines then rescale the prediction by the speed they measure.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

# Fraction of the matmul peak reached by a training step and by validation and sampling (no backward).
UTILISATION = {"train": 0.38, "inference": 0.20}
COMPILE_S = 80.0  # a cold compile of the training and no-grad graphs on a 2-core CPU
ARM_OVERHEAD_S = 10.0  # building the arm, loading the tower, checkpoints, event files


def forward_flops(model, captions: list[str], images: torch.Tensor) -> float:
    """FLOPs of one forward of the trainable path for these samples (the frozen tower is memoised, not counted)."""
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        states = model.states(captions)
        z = model.autoencoder.encode(images)
        t = torch.full((len(captions),), 0.5)
        if any(p.is_meta for p in model.generation.parameters()):  # model.parallelism.meta_init: count on meta
            z, t, states = z.to("meta"), t.to("meta"), states.to("meta")
        with FlopCounterMode(display=False) as counter:
            model(z, t, states)
    return counter.get_total_flops() / len(captions)


@dataclass
class ArmWork:
    """What one arm computes: its training steps, and its validation and sampling forwards."""

    train_flops: float
    inference_flops: float
    compile_s: float = 0.0

    def seconds(self, rate: float) -> float:
        flops = self.train_flops / UTILISATION["train"] + self.inference_flops / UTILISATION["inference"]
        return flops / rate + self.compile_s + ARM_OVERHEAD_S


@dataclass
class Plan:
    """The whole command: each arm's predicted seconds at `rate` FLOP/s, in the order the arms run."""

    rate: float
    arms: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, work: ArmWork) -> None:
        self.arms[name] = work.seconds(self.rate)

    @property
    def total(self) -> float:
        return sum(self.arms.values())

    def eta(self, arm: str, step: int, steps: int, since: tuple[int, float] | None = None) -> float:
        """Seconds left in the command: the prediction for what is left, scaled by how this arm's speed since
        `since` = (step, seconds ago) compares with its prediction (unscaled without it: the first step's time
        is mostly compiling)."""
        speed = 1.0
        if since is not None and step > since[0]:
            speed = since[1] / ((step - since[0]) / max(steps, 1) * self.arms[arm])
        names = list(self.arms)
        later = sum(self.arms[n] for n in names[names.index(arm) + 1:])
        return speed * (max(1 - step / max(steps, 1), 0.0) * self.arms[arm] + later)


def arm_work(module, datamodule, trainer, callbacks, first: bool = True) -> ArmWork:
    """Count an arm's work from its built module, data and trainer settings (no step is run); `first`: the
    command's first arm, which pays the cold compile."""
    datamodule.setup("fit")
    val = datamodule.val_dataloader()
    val = (val[0] if val else None) if isinstance(val, list) else val  # no val split: []
    images, captions = sample_inputs(datamodule.train_dataloader() if val is None else val, datamodule)
    per_sample = forward_flops(module.model, captions, images)
    steps = trainer.max_steps
    validations = 1 + (steps // trainer.val_check_interval if isinstance(trainer.val_check_interval, int) else 1)
    sampled = sum(c.images_sampled(validations) for c in callbacks if hasattr(c, "images_sampled"))
    per_image = module.sample_steps * (2 if module.cfg_scale != 1 else 1)
    inference = per_sample * (validations * sized(val) * len(module.val_timesteps) + sampled * per_image)
    compile_s = COMPILE_S if first and module.hparams.get("compile") else 0.0
    return ArmWork(3 * per_sample * steps * datamodule.batch_size, inference, compile_s)


def sized(loader) -> int:
    """Samples in a loader's dataset; 0 for none, or for a stream of unknown length (not counted)."""
    try:
        return len(loader.dataset) if loader is not None else 0
    except TypeError:
        return 0


def sample_inputs(loader, datamodule) -> tuple[torch.Tensor, list[str]]:
    """Two samples at the base image size, with real captions (their length sets the context length)."""
    batch = next(iter(loader))
    size = getattr(datamodule, "image_size", None) or tuple(batch.images.shape[-2:])
    return torch.randn(2, batch.images.shape[1], *size), list(batch.captions[:2])


def minutes(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
