"""What a Lightning checkpoint leaves out for an exact resume: the RNG states and where in the
epoch the data loader was. With them, a run killed at any step and resumed from its last
checkpoint ends with the weights an uninterrupted run ends with, bit for bit (on CPU)."""

from __future__ import annotations

import copy
import logging
import math
import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torchmetrics import Metric

from normlab.data.samplers import EpochSeededSampler
from normlab.errors import ConfigError
from normlab.tasks.base import AVERAGED_SUFFIX, Task

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


def _metric_holders(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """``module`` and, for a task evaluated beside its averaged copy (weight EMA), that copy,
    by the prefix of their metric names (the copy's are not among the task's modules)."""
    holders = {"": module}
    if isinstance(module, Task) and module.averaged is not None:
        holders[f"{AVERAGED_SUFFIX}/"] = module.averaged
    return holders


def metric_states(module: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """The accumulated states of the torchmetrics metrics in ``module`` (and in its averaged
    copy, prefixed ``_ema/``), by module name. They are not in its state_dict (torchmetrics
    keeps them out by default), so a run resumed in the middle of an epoch would compute that
    epoch's metrics over the batches after the resume only. With each state its number of
    updates, which says whether it has any to compute."""
    return {
        prefix + name: {**metric.metric_state, "_update_count": metric.update_count}
        for prefix, holder in _metric_holders(module).items()
        for name, metric in holder.named_modules()
        if isinstance(metric, Metric)
    }


def set_metric_states(module: torch.nn.Module, states: dict[str, dict[str, Any]]) -> None:
    metrics = {
        prefix + name: metric
        for prefix, holder in _metric_holders(module).items()
        for name, metric in holder.named_modules()
    }
    for name, state in states.items():
        metric = metrics.get(name)
        if not isinstance(metric, Metric):
            continue
        for key, value in state.items():
            if isinstance(value, list):
                value = [item.to(metric.device) for item in value]
            setattr(metric, key, value.to(metric.device) if torch.is_tensor(value) else value)


class ExactResume(pl.Callback):
    """Stores the RNG states in every checkpoint and, on resume, restores them and makes the
    training sampler skip the batches the interrupted epoch had already trained on.

    Both take effect in ``on_train_start``, after Lightning's sanity check (which the
    uninterrupted run did at another point), just before training continues. (Lightning calls no
    ``on_train_epoch_start`` for an epoch it resumes in the middle.) Mid-epoch resumes are exact with normlab's data modules on one process; under DDP
    (Lightning's DistributedSampler) the resumed epoch restarts its data order from the top.

    A checkpoint written during a validation inside fit (on a stop: see
    :class:`~normlab.callbacks.checkpointing.SaveOnSigterm`) stands for the moment before that
    validation, which a resume runs again: it stores the RNG and metric states of that moment.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._before_validation: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "ExactResume"

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            # Copies: validation updates the metric states in place. (Small: the validation
            # metrics were reset at the end of the last validation.)
            self._before_validation = {
                "rng_states": rng_states(),
                "metric_states": copy.deepcopy(metric_states(pl_module)),
            }

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Checkpoints written from here on (after validation) are of the state after it.
        self._before_validation = None

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._before_validation is not None:
            checkpoint.update(self._before_validation)
        else:
            checkpoint["rng_states"] = rng_states()
            checkpoint["metric_states"] = metric_states(pl_module)

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
            "metrics": checkpoint.get("metric_states", {}),
        }

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        if pending["rng"] is not None:
            set_rng_states(pending["rng"])
        else:
            log.warning("resumed from a checkpoint without RNG states: the resume is not exact")
        if trainer.current_epoch == pending["epoch"]:
            # What the epoch's accumulated metrics (train/acc over the epoch) had counted.
            set_metric_states(pl_module, pending["metrics"])
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
            log.info(
                "resumed in epoch %d after its batch %d: the data continues in the same order",
                trainer.current_epoch,
                batches,
            )
        else:
            log.warning(
                "resumed mid-epoch with a %s: epoch %d restarts from its first batch",
                type(sampler).__name__,
                trainer.current_epoch,
            )


class ResumeRecord(pl.Callback):
    """Records in every checkpoint what a later resume checks and reports: how many optimizer
    steps the learning-rate schedule was planned for, and the metrics so far. Resuming (``resume_mode=continue``) with a step budget
    the restored schedule was not planned for stops before training, naming the way to extend.
    """

    def __init__(self) -> None:
        self.planned_steps: int | None = None
        self.resumed: dict[str, Any] | None = None

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["resume_record"] = {
            "planned_steps": self.planned_steps,
            "metrics": scalar_metrics(trainer.callback_metrics),
        }

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.resumed = {"metrics": {}, **checkpoint.get("resume_record", {})}
        if self.resumed.get("planned_steps") is None:
            # Written before this record existed: OneCycleLR keeps its plan in its own state.
            schedulers = checkpoint.get("lr_schedulers", [])
            planned = [state["total_steps"] for state in schedulers if "total_steps" in state]
            self.resumed["planned_steps"] = planned[0] if planned else None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        requested = trainer.estimated_stepping_batches if trainer.lr_scheduler_configs else None
        requested = int(requested) if requested is not None and math.isfinite(requested) else None
        if self.resumed is None:
            self.planned_steps = requested
            return
        # The restored schedule keeps its plan (OneCycleLR's state) or is rebuilt for the new
        # budget while its step count continues (LambdaLR): either way not the schedule the
        # run started with.
        self.planned_steps = planned = self.resumed["planned_steps"]
        if requested is not None and planned is not None and requested != planned:
            raise ConfigError(
                f"resume_mode=continue: the learning-rate schedule in {trainer.ckpt_path} was "
                f"planned for {planned} optimizer steps, this run asks for {requested}; resume "
                "with the trainer.max_epochs/max_steps it started with, or extend it with "
                f"resume_mode=weights ckpt_path={trainer.ckpt_path} in a new run dir (its weights, "
                "a fresh optimizer and a schedule for the new budget)"
            )


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The one-number entries of ``trainer.callback_metrics`` as floats."""
    return {
        name: float(value)
        for name, value in metrics.items()
        if not isinstance(value, torch.Tensor) or value.numel() == 1
    }
