"""Checkpoints that survive interruptions and say where they came from: atomic writes that
check the disk first, one always-current ``last.ckpt``, a save when a run is stopped (SIGTERM,
SIGINT, USR2) in any phase of fit, and the run's record inside every checkpoint."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from normlab.errors import TrainingError
from normlab.ranges import OPTIONAL_COUNT, checked_arguments
from normlab.utils.writable_dirs import mebibytes

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
STAGED_SUFFIX = f".staged{PARTIAL_SUFFIX}"


def staged_path(path: Path) -> Path:
    """Where a checkpoint bound for ``path`` waits until it may replace it (see
    :class:`LastCheckpoint`): a partial save, so a run that starts removes one left by a kill."""
    return path.with_name(f".{path.name}{STAGED_SUFFIX}")


def destination(path: Path) -> Path:
    """The checkpoint a (possibly staged) ``path`` becomes: what errors name."""
    if path.name.startswith(".") and path.name.endswith(STAGED_SUFFIX):
        return path.with_name(path.name[1 : -len(STAGED_SUFFIX)])
    return path


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in ``value`` (nested dicts, lists and tuples): what a checkpoint of
    it takes on disk, give or take its small metadata."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, dict):
        return sum(tensor_bytes(item) for item in value.values())
    if isinstance(value, list | tuple):
        return sum(tensor_bytes(item) for item in value)
    return 0


def checkpoint_size_estimate(module: torch.nn.Module) -> int:
    """About the size of one full checkpoint of ``module``: its parameters and buffers, and twice
    the parameters again for the optimizer's state (Adam's two moments; SGD's momentum is less)."""
    parameters = sum(p.nbytes for p in module.parameters())
    buffers = sum(b.nbytes for b in module.buffers())
    return 3 * parameters + buffers


def remove_stale_partial_saves(directory: Path) -> None:
    """Delete the temporary files of saves that were killed before they finished (only while no
    other run writes to ``directory``: the run-dir lock is held)."""
    stale = sorted(directory.glob(f".*{PARTIAL_SUFFIX}"))
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info(
            "removed %d unfinished checkpoint write(s) of an earlier run from %s: %s",
            len(stale),
            directory,
            ", ".join(path.name for path in stale),
        )


def _disk_full_error(path: Path, needed: int) -> TrainingError:
    path = destination(path)
    free = shutil.disk_usage(path.parent).free
    return TrainingError(
        f"cannot write {path}: {path.parent} has {mebibytes(free)} free, the checkpoint needs "
        f"about {mebibytes(needed)}; the previous {path.name} (if any) is kept. Free space there "
        "and continue with ckpt_path=last or resume=auto"
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside its destination, flushes it to disk and
    renames it into place: a kill during a save leaves the previous ``last.ckpt`` intact, never a
    truncated one. A disk without room for the checkpoint stops the run with one line naming the
    directory and its free space (checked before writing, and when a write fails), and the
    previous checkpoint stays.

    Lightning's own atomic save (an fsspec transaction) writes its temporary file to the system
    temp dir, and moving that onto another filesystem is a copy, without fsync: not atomic."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        needed = tensor_bytes(checkpoint)
        if shutil.disk_usage(path.parent).free < needed:
            raise _disk_full_error(path, needed)
        partial = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
        try:
            with partial.open("wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, path)
        except (OSError, RuntimeError) as error:
            # torch's C++ writer reports a full disk as "enforce fail ... unexpected pos".
            disk_full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
            if disk_full or shutil.disk_usage(path.parent).free < needed:
                raise _disk_full_error(path, needed) from error
            raise
        finally:
            partial.unlink(missing_ok=True)


class SaveOnSigterm(pl.Callback):
    """When a run is stopped through Lightning's SIGTERM path (SLURM pre-emption, ``kill``, and
    SIGINT or USR2 through :class:`~normlab.callbacks.preemption.StopOnSignal`), Lightning stops
    after the current batch; this writes ``last.ckpt`` with the last completed training step, in
    every phase of ``fit``:

    - in training, the state after the batch just finished;
    - in a validation, the state before it, marked as a validation interrupted before its first
      batch: a resume runs the whole validation again, then goes on as the uninterrupted run
      (:class:`~normlab.callbacks.ExactResume` supplies that moment's RNG and metric states);
    - in the sanity check, nothing: no step was taken since the run (re)started, and whatever it
      resumed from is still on disk.

    ``saved_step`` (None when nothing was saved) and ``phase`` tell the entry point what to report.

    Not Lightning's ``OnExceptionCheckpoint``: that one saves on any exception (after a NaN step
    too, over the last good ``last.ckpt``) and deletes its file when the run ends."""

    def __init__(self, dirpath: str | Path) -> None:
        self.path = Path(dirpath) / "last.ckpt"
        self.saved_step: int | None = None
        self.phase = ""
        self._in_validation = False

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        if trainer.state.fn != TrainerFn.FITTING:
            self.phase = "testing" if trainer.state.fn == TrainerFn.TESTING else "evaluating"
            return
        if trainer.sanity_checking:
            self.phase = "the sanity check"
            return
        self._in_validation = trainer.validating
        self.phase = "validation" if self._in_validation else "training"
        try:
            trainer.save_checkpoint(self.path, weights_only=False)  # optimizer state too
        finally:
            self._in_validation = False
        self.saved_step = trainer.global_step

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._in_validation:
            validation = checkpoint["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]
            restart_validation(validation)


def restart_validation(progress: dict[str, Any]) -> None:
    """Rewrite a validation loop's stored progress, taken during a validation, as that of a
    validation interrupted in its first batch: Lightning's restart then runs the validation again
    from its first batch (and counts it once)."""
    current, total = progress["current"], progress["total"]
    for key in ("ready", "started", "processed", "completed"):
        total[key] -= current[key]
        current[key] = 0
    for counter in (current, total):
        counter["ready"] += 1
        counter["started"] += 1
    progress["is_last_batch"] = False


@checked_arguments(every_n_train_steps=OPTIONAL_COUNT)
class LastCheckpoint(pl.Callback):
    """Keeps one ``last.ckpt``, always the newest state: written every ``every_n_train_steps``
    optimizer steps, after each validation and when training ends (so a ``max_steps`` run that
    stops mid-epoch has its final weights on disk), each time replacing the previous one, also
    one that cannot be read.

    A checkpoint taken at the end of a training batch is staged beside ``last.ckpt`` and moved
    into place only once the loggers hold that batch's values on disk (at the next hook): Lightning
    logs a batch after its ``on_train_batch_end``, and a resumed run does not log it again, so a
    kill between the two would lose the batch's ``metrics.csv`` row. A kill before the move
    leaves the previous ``last.ckpt``, and the staged file is a partial save the next run removes.
    A step that a validation follows (the epoch's last, or one of ``val_check_interval``) is saved
    after that validation (or at the epoch's end), never before it: a resume would skip it.
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int | None = None) -> None:
        self.path = Path(dirpath) / "last.ckpt"
        self.staged = staged_path(self.path)
        self.every_n_train_steps = every_n_train_steps
        self._saved_step = -1

    def _save(self, trainer: pl.Trainer, path: Path) -> None:
        if trainer.fast_dev_run:  # a wiring check, as for Lightning's ModelCheckpoint
            return
        trainer.save_checkpoint(path, weights_only=False)
        self._saved_step = trainer.global_step

    def _publish_staged(self, trainer: pl.Trainer) -> None:
        # Rank 0 alone writes checkpoints; the others may see its file on a shared disk.
        if not trainer.is_global_zero or not self.staged.is_file():
            return
        for logger in trainer.loggers:
            logger.save()
        os.replace(self.staged, self.path)

    def _step_save_due(self, trainer: pl.Trainer) -> bool:
        every = self.every_n_train_steps
        return (
            bool(every)
            and trainer.global_step % every == 0
            and (trainer.global_step != self._saved_step)
        )

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        # Not after an epoch's last batch: Lightning resumes such a checkpoint in the next epoch,
        # skipping the validation that follows the batch; on_validation_end or
        # on_train_epoch_end saves that step instead.
        last_batch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if self._step_save_due(trainer) and not last_batch:
            self._save(trainer, self.staged)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._publish_staged(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking and self._staged_now(trainer):
            # A validation inside the epoch (val_check_interval) follows the step just staged:
            # Lightning would resume that checkpoint past the validation, never running it. The
            # step is saved at on_validation_end instead; until then last.ckpt stays the
            # previous one, and its batch's rows stay with the loggers, as a resume from there
            # logs them again.
            self.staged.unlink(missing_ok=True)
            return
        self._publish_staged(trainer)

    def _staged_now(self, trainer: pl.Trainer) -> bool:
        return self.staged.is_file() and self._saved_step == trainer.global_step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._publish_staged(trainer)
        if self._step_save_due(trainer):  # the epoch's last step, when no validation saved it
            self._save(trainer, self.path)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException):
            # SaveOnSigterm writes the state of this moment, which a staged file must not replace.
            self.staged.unlink(missing_ok=True)
            return
        # The staged state is a finished step's and its values were logged; if the loggers cannot
        # write them now (a full disk), it stays staged, and the previous last.ckpt stays.
        try:
            self._publish_staged(trainer)
        except OSError as error:
            log.warning("kept the previous %s: the loggers could not save (%s)", self.path, error)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._save(trainer, self.path)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._publish_staged(trainer)
        # Always: the loop counters now say "finished", which a resume of this run relies on.
        self._save(trainer, self.path)


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
