"""Stop for a scheduler's pre-emption or time-limit signal at a step boundary that every process
agrees on, through Lightning's SIGTERM path (which writes ``last.ckpt``: see
:class:`~normlab.callbacks.checkpointing.SaveOnSigterm`)."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl

log = logging.getLogger(__name__)


class StopOnSignal(pl.Callback):
    """On ``signal_name`` (submitit's pre-emption signal, USR2, which Slurm also sends
    ``signal_delay_s`` before the time limit), finish the current training step and stop as if
    SIGTERM had arrived then.

    Under DDP the signal reaches the processes at different points of a step; acting on it there
    would put the ranks' collectives out of step. The request is therefore only recorded, and
    after each training batch the ranks agree (any rank asked → all stop) before SIGTERM is raised
    in every process at the same step. Outside training (set-up, testing) there is no step to
    finish: the handler that was installed before (submitit's requeue) handles the signal.
    """

    def __init__(self, signal_name: str = "SIGUSR2") -> None:
        self.signum = signal.Signals[signal_name]
        self.requested = False
        self._training = False
        self._previous: Callable[..., Any] | int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Installed once and left in place: outside training it passes the signal on. (Lightning
        # reinstalls, after each stage, the handlers it found before it, so a restore here would
        # not last anyway.)
        current = signal.getsignal(self.signum)
        if current != self._on_signal:
            self._previous = current
            signal.signal(self.signum, self._on_signal)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._training = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training = False

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._training:
            log.warning("%s: stopping after this training step", signal.Signals(signum).name)
            self.requested = True
        elif callable(self._previous):
            self._previous(signum, frame)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        # A collective in every process at every step: the decision is the same everywhere.
        if trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            self.requested = False
            # Lightning's SIGTERM handler runs now, in this step; the loop stops at its end.
            os.kill(os.getpid(), signal.SIGTERM)
