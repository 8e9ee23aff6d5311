"""Non-finite losses: stop the run at the step they appear (default), or skip that batch."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor

from normlab.errors import TrainingError
from normlab.ranges import check_choice

log = logging.getLogger(__name__)

POLICIES = ("stop", "skip")


class NonFiniteLossError(TrainingError):
    """A loss term was NaN or infinite."""


class LossGuard:
    """Checks a training step's loss terms before the backward pass.

    ``stop``: raise :class:`NonFiniteLossError` naming the step and the terms, before anything is
    updated (the checkpoints on disk, if any were written yet, are states from before that
    step). ``skip``: the caller leaves the batch out (no backward, no optimizer step) and the
    module's buffers are put back as they were before the step (:meth:`remember`): a NaN batch's
    forward pass has already poisoned the running statistics of every BatchNorm. Skips are
    counted in ``train/nonfinite_skips``; past ``max_fraction`` of the checked steps,
    :meth:`check_skipped_fraction` stops the run (a run that skips most batches trains nothing).
    Under DDP every rank skips when one rank's loss is not finite, so they stay in step.
    The check reads the loss on the host: one device synchronisation per step on a GPU.
    """

    def __init__(self, policy: str = "stop", max_fraction: float = 0.25) -> None:
        self.policy = check_choice("on_nonfinite_loss", policy, POLICIES)
        self.max_fraction = max_fraction
        self.checked = 0
        self.skipped = 0
        self._buffers: list[Tensor] = []

    def remember(self, module: pl.LightningModule) -> None:
        """Call at the start of a training step: with ``skip``, copies the module's buffers
        (running statistics: small) so a skipped step can put them back."""
        if self.policy == "skip":
            self._buffers = [buffer.detach().clone() for buffer in module.buffers()]

    def check(
        self, module: pl.LightningModule, terms: Mapping[str, Tensor], batch_idx: int
    ) -> bool:
        """True if every term is finite; False if the batch is to be skipped."""
        self.checked += 1
        bad = {name: value for name, value in terms.items() if not torch.isfinite(value).all()}
        finite = not bad
        trainer = module.trainer
        if trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return True
        where = f"step {trainer.global_step + 1} (epoch {trainer.current_epoch}, batch {batch_idx})"
        values = ", ".join(f"{name}={float(value.detach().sum()):g}" for name, value in bad.items())
        values = values or "on another process"
        if self.policy == "stop":
            raise NonFiniteLossError(
                f"non-finite loss at {where}: {values}. Stopped before updating anything; "
                f"{_saved_states(trainer)} (task.on_nonfinite_loss=skip skips such batches instead)"
            )
        self.skipped += 1
        with torch.no_grad():
            for buffer, saved in zip(module.buffers(), self._buffers, strict=True):
                buffer.copy_(saved)
        log.warning(
            "non-finite loss at %s: %s; batch skipped (%d so far)", where, values, self.skipped
        )
        module.log("train/nonfinite_skips", float(self.skipped), on_step=True, on_epoch=False)
        return False

    def check_skipped_fraction(self) -> None:
        """Stop the run (:class:`NonFiniteLossError`) once ``skip`` has left out more than
        ``max_fraction`` of the loss checks this process made; called at the end of every
        training epoch and of training."""
        if self.skipped and self.skipped > self.max_fraction * self.checked:
            raise NonFiniteLossError(
                f"task.on_nonfinite_loss=skip left out {self.skipped} of {self.checked} training "
                f"steps ({self.skipped / self.checked:.0%}), more than "
                f"task.max_nonfinite_fraction={self.max_fraction:g}: the run is not training. "
                "Lower the learning rate, or debug=anomaly finds the op that produces them"
            )


def _saved_states(trainer: pl.Trainer) -> str:
    """What the run dir holds to go back to, for the stop message."""
    dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
    if dirpath and any(Path(dirpath).glob("*.ckpt")):
        return f"the checkpoints in {dirpath} hold states from before this step"
    return "no checkpoint had been written yet"
