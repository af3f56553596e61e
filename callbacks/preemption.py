"""SIGTERM or SIGUSR1 (a scheduler's preemption or SLURM's requeue warning): save a checkpoint and exit non-zero."""
from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import lightning as L

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """Ends the process with 128 + the signal's number, as a shell reports a process the signal killed."""


class Preemption(L.Callback):
    """On SIGTERM or SIGUSR1 the run finishes its current step, writes `<run>/checkpoints/preempted-step=N.ckpt`
    (the same point in a step as ModelCheckpoint's saves, so `fit --ckpt_path last` continues exactly) and exits
    with code 128 + signal. Lightning's own SIGTERM handling ends the run with exit code 0 and no checkpoint,
    which a scheduler reads as success; this handler replaces it for the length of `fit`.

    Under DDP/FSDP every rank learns of a signal any rank received (one all-reduce of a flag per step), so all
    ranks save together."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        # after the trainer registered its own handlers (between on_fit_start and here), so these replace them
        if threading.current_thread() is threading.main_thread():  # signals can only be set there
            self._previous = {s: signal.signal(s, self._handler) for s in SIGNALS}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        path = folder / f"preempted-step={trainer.global_step}.ckpt"
        trainer.save_checkpoint(path)
        signum = self.received or signal.SIGTERM
        if trainer.is_global_zero:
            print(f"preempted by {signal.Signals(signum).name} after step {trainer.global_step}: saved {path}; "
                  "continue with the same command and --ckpt_path last", file=sys.stderr, flush=True)
        raise Preempted(128 + signum)

    def teardown(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
