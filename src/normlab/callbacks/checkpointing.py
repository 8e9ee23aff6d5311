"""Checkpoints that survive interruptions and say where they came from: atomic writes, one
always-current ``last.ckpt``, a save on SIGTERM, and the run's record inside every checkpoint."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from normlab.ranges import OPTIONAL_COUNT, checked_arguments

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside its destination, flushes it to disk and
    renames it into place: a kill during a save leaves the previous ``last.ckpt`` intact, never a
    truncated one.

    Lightning's own atomic save (an fsspec transaction) writes its temporary file to the system
    temp dir, and moving that onto another filesystem is a copy, without fsync: not atomic."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            with partial.open("wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


class SaveOnSigterm(pl.Callback):
    """On SIGTERM (SLURM pre-emption, ``kill``), Lightning stops after the current batch; this
    writes ``last.ckpt`` at that point so the run resumes from there, not from the last periodic
    checkpoint.

    Not Lightning's ``OnExceptionCheckpoint``: that one saves on any exception (after a NaN step
    too, over the last good ``last.ckpt``) and deletes its file when the run ends."""

    def __init__(self, dirpath: str | Path) -> None:
        self.path = Path(dirpath) / "last.ckpt"

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException) and trainer.training:
            trainer.save_checkpoint(self.path, weights_only=False)  # optimizer state too
            log.warning("SIGTERM: saved %s at step %d", self.path, trainer.global_step)


@checked_arguments(every_n_train_steps=OPTIONAL_COUNT)
class LastCheckpoint(pl.Callback):
    """Keeps one ``last.ckpt``, always the newest state: written every ``every_n_train_steps``
    optimizer steps, after each validation and when training ends (so a ``max_steps`` run that
    stops mid-epoch has its final weights on disk), each time replacing the previous one, also
    one that cannot be read."""

    def __init__(self, dirpath: str | Path, every_n_train_steps: int | None = None) -> None:
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_train_steps = every_n_train_steps
        self._saved_step = -1

    def _save(self, trainer: pl.Trainer) -> None:
        if trainer.fast_dev_run:  # a wiring check, as for Lightning's ModelCheckpoint
            return
        trainer.save_checkpoint(self.path, weights_only=False)
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        every = self.every_n_train_steps
        step = trainer.global_step
        if every and step % every == 0 and step != self._saved_step:
            self._save(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Always: the loop counters now say "finished", which a resume of this run relies on.
        self._save(trainer)


class CheckpointPosition(pl.Callback):
    """Tests a checkpoint at the step and epoch it was saved at: the metrics of an evaluation are
    logged there (``csv/metrics.csv``'s step and epoch, wandb's step), not at step 0."""

    def __init__(self, global_step: int, epoch: int) -> None:
        self.global_step = global_step
        self.epoch = epoch

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The counters Lightning's logger connector reads (a fit restores them from the
        # checkpoint's loop state; a test alone does not).
        trainer.fit_loop.epoch_loop._batches_that_stepped = self.global_step
        trainer.fit_loop.epoch_progress.current.completed = self.epoch


class RunInfo(pl.Callback):
    """Stores the resolved config and git SHA inside every checkpoint under ``"normlab"``."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["normlab"] = self.info
