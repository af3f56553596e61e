"""Progress that reads on a terminal and in a log: Lightning's rich bar on a terminal, plain lines elsewhere."""
from __future__ import annotations

import sys
import time

from lightning.pytorch.callbacks import RichProgressBar

from mos_lightning.budget import Plan, minutes


class StepProgress(RichProgressBar):
    """The rich bar, labelled by arm, on a terminal; a plain line every `every_n_steps` steps when stderr is
    not one (a log file, a scheduler), with arm, step/total, loss, it/s and the ETA of the arm and of the
    whole command. The ETA scales the plan's prediction for what is left by the speed measured so far.

    Args:
        every_n_steps: how often a plain line is printed (and the first and last step).
        plan: the arms runner's prediction for the whole command; None: this arm alone.
        arm: which of the plan's arms this run is.
    """

    def __init__(self, every_n_steps: int = 50, plan: Plan | None = None, arm: str | None = None):
        super().__init__()
        self.every_n_steps, self.plan, self.arm = max(int(every_n_steps), 1), plan, arm
        self.plain = not sys.stderr.isatty()
        if self.plain:
            self.disable()
        self._last_time = self._last_step = self._first = None
        self._val_start = 0.0
        self._paused = 0.0  # seconds spent outside training steps since the last line (validation, sampling)

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{self.arm or 'train'} ({self.trainer.max_steps} steps)"

    @property
    def total_train_batches(self):
        """The bar counts optimiser steps over the whole run, not batches of one epoch."""
        steps = self.trainer.max_steps
        return steps if steps and steps > 0 else super().total_train_batches

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version is the arm's name, already in the description
        return metrics

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_time, self._last_step = time.perf_counter(), trainer.global_step
        self._paused, self._first = 0.0, None

    def on_validation_start(self, trainer, pl_module) -> None:
        super().on_validation_start(trainer, pl_module)
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        self._paused += time.perf_counter() - self._val_start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._update(self.train_progress_bar_id, trainer.global_step)  # steps so far, across epochs
        step, total = trainer.global_step, trainer.max_steps
        if not self.plain or not trainer.is_global_zero or self._last_time is None:
            return
        if step % self.every_n_steps and step not in (1, total):
            return
        print(self.line(step, total, trainer.callback_metrics.get("train/loss")), file=sys.stderr, flush=True)

    def line(self, step: int, total: int, loss, now: float | None = None) -> str:
        """Speeds and ETAs count from the first line on: the first step's time is mostly compiling."""
        now = time.perf_counter() if now is None else now
        rate = (step - self._last_step) / max(now - self._last_time - self._paused, 1e-9)
        first = self._first is None
        if first:
            self._first = (step, now)
        self._last_time, self._last_step, self._paused = now, step, 0.0
        text = f"[{self.arm or 'train'}] step {step}/{total}"
        if loss is not None:
            text += f"  loss {float(loss):.4f}"
        text += f"  {rate:.2f} it/s"
        if not first:
            text += f"  arm ETA {minutes(max(total - step, 0) / max(rate, 1e-9))}"
        if self.plan is not None and self.arm in self.plan.arms:
            since = None if first else (self._first[0], now - self._first[1])
            text += f"  command ETA {minutes(self.plan.eta(self.arm, step, total, since))}"
        return text
