"""Checkpoints that survive interruptions: atomic writes, a save on SIGTERM, and the rules for
which checkpoint a run resumes from."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from normlab.errors import ConfigError

log = logging.getLogger(__name__)

RESUME_MODES = ("auto", "never")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside its destination, flushes it to disk and
    renames it into place: a kill during a save leaves the previous ``last.ckpt`` intact, never a
    truncated one."""

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
    checkpoint."""

    def __init__(self, dirpath: str | Path) -> None:
        self.path = Path(dirpath) / "last.ckpt"

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException) and trainer.training:
            trainer.save_checkpoint(self.path, weights_only=False)  # optimizer state too
            log.warning("SIGTERM: saved %s at step %d", self.path, trainer.global_step)


def newest_checkpoint(directory: Path) -> Path | None:
    """The most recently written ``*.ckpt`` in ``directory`` (None if there is none)."""
    candidates = list(directory.glob("*.ckpt")) if directory.is_dir() else []
    return max(candidates, key=lambda path: path.stat().st_mtime_ns, default=None)


def resume_checkpoint(ckpt_path: str | None, resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint a run continues from, or None for a fresh start.

    - ``ckpt_path=<file>``: that file.
    - ``ckpt_path=last``: ``<run dir>/checkpoints/last.ckpt``; the run dir must be the one to
      continue (``hydra.run.dir=...``). Unlike Lightning, which starts from scratch when it finds
      no ``last.ckpt``, a missing one is an error.
    - ``resume=auto``: the newest checkpoint in ``<run dir>/checkpoints`` if there is one, else a
      fresh start: one command for a first start and every restart (SLURM requeues).
    """
    checkpoints = run_dir / "checkpoints"
    if resume not in (None, *RESUME_MODES):
        raise ConfigError(f"resume={resume!r} is not one of {', '.join(RESUME_MODES)} (or null)")
    if ckpt_path == "last":
        last = checkpoints / "last.ckpt"
        if not last.is_file():
            raise ConfigError(
                f"ckpt_path=last: there is no {last}; continue a run with "
                "hydra.run.dir=<its run dir> ckpt_path=last, or give ckpt_path=<checkpoint file>"
            )
        return last
    if ckpt_path is not None:
        path = Path(ckpt_path)
        if not path.is_file():
            raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint file")
        return path
    if resume == "auto":
        found = newest_checkpoint(checkpoints)
        log.info("resume=auto: %s", f"continuing from {found}" if found else "no checkpoint yet")
        return found
    return None
