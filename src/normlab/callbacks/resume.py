"""What a Lightning checkpoint leaves out for an exact resume: the RNG states and where in the
epoch the data loader was. With them, a run killed at any step and resumed from its last
checkpoint ends with the weights an uninterrupted run ends with, bit for bit (on CPU)."""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from normlab.data.transforms import EpochSeededSampler

log = logging.getLogger(__name__)


def rng_states() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states, as tensors and plain containers so the
    checkpoint still loads with ``torch.load(weights_only=True)``."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


class ExactResume(pl.Callback):
    """Stores the RNG states in every checkpoint and, on resume, restores them and makes the
    training sampler skip the batches the interrupted epoch had already trained on.

    Both take effect in ``on_train_start``, after Lightning's sanity check (which the
    uninterrupted run did at another point), just before training continues. (Lightning calls no
    ``on_train_epoch_start`` for an epoch it resumes in the middle.) Mid-epoch resumes are exact with normlab's data modules on one process; under DDP
    (Lightning's DistributedSampler) the resumed epoch restarts its data order from the top.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "ExactResume"

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
        self._pending = {
            "rng": checkpoint.get("rng_states"),
            "epoch": checkpoint["epoch"],
            # Saved in on_train_batch_end (processed = completed + 1) or after it: the batches
            # of this epoch that have gone through a training step.
            "batches": progress["processed"],
        }

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        if pending["rng"] is not None:
            set_rng_states(pending["rng"])
        else:
            log.warning("resumed from a checkpoint without RNG states: the resume is not exact")
        batches = pending["batches"]
        if (
            trainer.current_epoch != pending["epoch"]
            or not 0 < batches < trainer.num_training_batches
        ):
            return  # saved at an epoch's end: the next epoch starts from its first batch
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, EpochSeededSampler):
            sampler.skip_next(batches * loader.batch_size)
        else:
            log.warning(
                "resumed mid-epoch with a %s: epoch %d restarts from its first batch",
                type(sampler).__name__,
                trainer.current_epoch,
            )
