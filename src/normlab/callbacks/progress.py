"""Training progress a user can read wherever the output goes: Rich's live bar in a terminal, and
plain log lines at a fixed interval where there is none (nohup, a Slurm job's ``.out`` file, CI),
where a live bar would print nothing until the run ends."""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

from normlab.errors import ConfigError

log = logging.getLogger("normlab.progress")


def _shown_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    # Lightning adds the logger's version (wandb's run id, "v_num: 1bc_"): nothing a user reads.
    return {name: value for name, value in metrics.items() if name != "v_num"}


def duration(seconds: float) -> str:
    """``seconds`` as a person says it: 45s, 12m, 3h05m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def time_left(done: float, total: float, elapsed: float) -> str:
    """``about 12m00s left`` for ``done`` of ``total`` units in ``elapsed`` seconds, at that pace
    ("" before anything is done)."""
    if done <= 0:
        return ""
    return f"about {duration(elapsed / done * max(0.0, total - done))} left"


class ReadableRichProgressBar(RichProgressBar):
    """Lightning's Rich bar without the logger's version number among the metrics."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return _shown_metrics(super().get_metrics(trainer, pl_module))


class LoggedProgress(ProgressBar):
    """One log line (``normlab.progress``: stdout and the run's ``train.log``) every
    ``every_n_steps`` optimizer steps or ``every_n_seconds``, whichever comes first (either may be
    None), and one at the end of every epoch: the epoch, the step out of the run's steps, the
    progress-bar metrics (the loss), steps per second and the time left at that pace."""

    def __init__(self, every_n_steps: int | None = None, every_n_seconds: float | None = 60.0):
        super().__init__()
        for name, value in (("every_n_steps", every_n_steps), ("every_n_seconds", every_n_seconds)):
            if value is not None and value <= 0:
                raise ConfigError(
                    f"callbacks.progress_bar.{name}={value}: must be positive or null"
                )
        self.every_n_steps = every_n_steps
        self.every_n_seconds = every_n_seconds
        self._enabled = True
        self._started = self._last_time = 0.0
        self._first_step = self._last_step = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = self._last_time = time.monotonic()
        # A resumed run counts its pace from where it continues.
        self._first_step = self._last_step = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if batch_idx + 1 == trainer.num_training_batches:
            return  # the epoch's own line follows
        step, now = trainer.global_step, time.monotonic()
        due_by_steps = self.every_n_steps and step - self._last_step >= self.every_n_steps
        due_by_time = self.every_n_seconds and now - self._last_time >= self.every_n_seconds
        if due_by_steps or due_by_time:
            self._report(trainer, pl_module, "")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, pl_module, " done")

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, suffix: str) -> None:
        step, now = trainer.global_step, time.monotonic()
        self._last_step, self._last_time = step, now
        if not self._enabled or not trainer.is_global_zero:
            return
        epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else "?"
        parts = [f"epoch {trainer.current_epoch + 1}/{epochs}{suffix}"]
        total = trainer.estimated_stepping_batches
        parts.append(f"step {step}/{total if math.isfinite(total) else '?'}")
        for name, value in _shown_metrics(self.get_metrics(trainer, pl_module)).items():
            parts.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
        elapsed, done = now - self._started, step - self._first_step
        parts.append(f"{done / elapsed if elapsed > 0 else 0.0:.2f} steps/s")
        if done > 0 and math.isfinite(total):
            parts.append(time_left(done, total - self._first_step, elapsed))
        log.info(" | ".join(parts))


def terminal_or_logged_progress(
    every_n_steps: int | None = None, every_n_seconds: float | None = 60.0
) -> ProgressBar:
    """The progress callback for where stdout goes: Rich's bar in a terminal, else
    :class:`LoggedProgress` with the given interval."""
    if sys.stdout.isatty():
        return ReadableRichProgressBar()
    return LoggedProgress(every_n_steps, every_n_seconds)
