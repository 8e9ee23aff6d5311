"""Stop for Ctrl-C (SIGINT) or a scheduler's pre-emption or time-limit signal (USR2) at a batch
boundary that every process agrees on, through Lightning's SIGTERM path (which writes
``last.ckpt``: see :class:`~normlab.callbacks.checkpointing.SaveOnSigterm`)."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from normlab.callbacks.checkpointing import SaveOnSigterm

log = logging.getLogger(__name__)


class StopOnSignal(pl.Callback):
    """On ``signal_name`` (Ctrl-C's SIGINT; submitit's pre-emption signal USR2, which Slurm also
    sends ``signal_delay_s`` before the time limit), finish the current training, validation or
    test batch and stop as if SIGTERM had arrived then.

    Under DDP the signal reaches the processes at different points of a batch; acting on it there
    would put the ranks' collectives out of step. The request is therefore only recorded, and
    after each batch the ranks agree (any rank asked → all stop), and every process stops at the
    end of that batch as on SIGTERM. The handler is installed when the first Trainer stage sets
    up and stays for the run: before that (start-up) the handler that was installed before
    handles the signal (Python's KeyboardInterrupt, submitit's requeue), and so does a second
    signal while the stop is pending (Ctrl-C twice stops at once, without a save).
    """

    def __init__(self, signal_name: str = "SIGUSR2") -> None:
        self.signum = signal.Signals[signal_name]
        self.requested = False
        # Whether this callback stopped the run: the entry point names the signal and exits with
        # its code.
        self.stopped = False
        self._previous: Callable[..., Any] | int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Installed once and left in place: Lightning reinstalls, after each stage, the handlers
        # it found before it, so a restore here would not last. normlab.train restores SIGINT
        # once the run is over.
        current = signal.getsignal(self.signum)
        if current != self._on_signal:
            # The handler of an earlier run's StopOnSignal (a multirun's jobs share a process)
            # gives way: the one before it is the previous handler.
            earlier = getattr(current, "__self__", None)
            self._previous = earlier._previous if isinstance(earlier, StopOnSignal) else current
            signal.signal(self.signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if not self.requested:
            log.warning(
                "%s: stopping after this batch (again to stop at once)", signal.Signals(signum).name
            )
            self.requested = True
        elif callable(self._previous):
            self._previous(signum, frame)

    def _stop_if_requested(self, trainer: pl.Trainer) -> None:
        # A collective in every process at every batch: the decision is the same everywhere.
        if trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            self.requested = False
            self.stopped = True
            # What Lightning's SIGTERM handler records: the loops stop at the end of this batch,
            # in every process at once. Not a SIGTERM sent to each process: that handler forwards
            # it to the processes Lightning started and broadcasts from inside the handler, so
            # the other ranks would take part in one broadcast more than rank 0 and wait forever.
            trainer._signal_connector.received_sigterm = True

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._stop_if_requested(trainer)

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._stop_if_requested(trainer)

    def on_test_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._stop_if_requested(trainer)


def stopping_signal(trainer: pl.Trainer) -> signal.Signals:
    """The signal that stopped ``trainer`` through Lightning's SIGTERM path: the one a
    :class:`StopOnSignal` acted on, else SIGTERM itself."""
    for callback in trainer.callbacks:
        if isinstance(callback, StopOnSignal) and callback.stopped:
            return callback.signum
    return signal.SIGTERM


def report_stop(trainer: pl.Trainer, saver: SaveOnSigterm, run_dir: Path) -> int:
    """Log in one line what a run stopped through Lightning's SIGTERM path saved and how to go
    on; return its exit code: 130 after SIGINT (as a shell reports Ctrl-C), else 143 (also after
    USR2, whose stop is a SIGTERM to the Slurm launcher, which requeues the job on 143)."""
    name = stopping_signal(trainer).name
    code = 128 + (signal.SIGINT if name == "SIGINT" else signal.SIGTERM)
    same_dir = f"hydra.run.dir={run_dir}"
    if not trainer.is_global_zero:
        return code
    if saver.saved_step is not None:
        log.warning(
            "stopped by %s in %s: saved %s at step %d; continue with %s ckpt_path=last",
            name,
            saver.phase,
            saver.path,
            saver.saved_step,
            same_dir,
        )
    elif saver.phase == "the sanity check" and not trainer.ckpt_path:
        log.warning(
            "stopped by %s in the sanity check, before the first training step: nothing to save; "
            "start the run again with the same command",
            name,
        )
    elif saver.phase == "the sanity check":
        log.warning(
            "stopped by %s in the sanity check: nothing new to save; continue with %s ckpt_path=%s",
            name,
            same_dir,
            trainer.ckpt_path,
        )
    else:
        # Testing: training has finished and last.ckpt holds its end; a resume trains nothing.
        log.warning(
            "stopped by %s while %s, after training: test again with %s ckpt_path=last",
            name,
            saver.phase or "testing",
            same_dir,
        )
    return code
