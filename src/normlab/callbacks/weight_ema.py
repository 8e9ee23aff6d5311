"""Weight EMA (``callbacks=ema``): an exponential moving average of the weights, evaluated beside
the trained ("raw") model, with a choice of what the averaged model's norm statistics are.

Built on Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging` (torch's
``AveragedModel`` holds the averaged copy of the whole task and does the updates) with these
differences from Lightning's ``EMAWeightAveraging``:

- **Decay per optimizer step, with timm's warm-up.** Optimizer step ``u`` (``trainer.global_step``,
  which counts both of pix2pix's optimizers) has the decay
  ``β(t) = min(decay, 1 − (1 + t/γ)^−power)``, ``t = u − start_step − 1`` (timm's ``ModelEmaV3``,
  ``warmup_gamma`` γ = 1 and ``warmup_power`` 2/3 by default: 0.9 after 31 steps, 0.99 after 1,000,
  0.999 after 31,600), or ``decay`` throughout with ``decay_warmup=false``. An update after
  the steps ``l+1 … s`` keeps ``Π β(u)`` of the old average, what one update per step would keep
  if the weights had not moved in between: the average forgets at the same rate per step
  whatever ``update_every_n_steps`` is (torchvision's reference scales ``1 − decay`` by the
  interval, the first-order version of this).
- **Start.** Until the first update (the first optimizer step after ``start_step``, which
  copies the weights) the averaged model is the raw one, as in timm; afterwards it is updated
  at most every ``update_every_n_steps`` steps. Lightning's step rule (``step % n == 0``) never
  fires for pix2pix, whose global step moves by two per batch.
- **Norm buffers** (``norm_buffers``): ``average`` averages the norms' running statistics with
  the weights (timm's ``ModelEmaV2``; integer buffers, e.g. ``num_batches_tracked``, are
  copied); ``copy`` takes the raw model's (mmengine's default); ``recompute`` recomputes them
  for the averaged weights with PreciseBN over ``recompute_images`` training images (merged
  across DDP processes), before each validation in ``fit`` and at the end of training (then
  they are what every checkpoint saved after that moment holds). Norms without running
  statistics (gn, ln, frn, ...) have nothing to choose: said once in the log.
- **Both models are evaluated.** Lightning swaps the averaged weights in for validation and
  copies them into the model when training ends; here the raw model stays the trained one and
  the task evaluates the averaged copy beside it (:meth:`normlab.tasks.Task.evaluated_models`),
  logging its metrics with the suffix ``_ema``. ``ema.select`` says which of the two the best
  checkpoint and the sweeps' objective follow (``normlab.validation.apply_ema_selection``).
- **Networks not averaged** (:attr:`~normlab.tasks.Task.averaged_network_names`; pix2pix's
  discriminator): in the averaged copy they are the raw model's, copied before every
  evaluation and checkpoint.
- **Devices and precision**: the copy is built on the training device in the training
  precision (Lightning builds it before either is set up). A compiled network's copy runs
  uncompiled (evaluation only).
- **DDP**: the weights are the same on every process (DDP keeps them so); the averaged model's
  buffers are rank 0's, broadcast before every evaluation and at the end of training: with
  ``bn`` (per-process statistics) rank 0's averaged or copied statistics, as DDP's own
  ``broadcast_buffers`` gives the raw model; with ``syncbn`` they are the same everywhere
  anyway; ``recompute`` merges every process's batches. Said once in the log.

**Checkpoint format** (Lightning's, which ``normlab.eval`` and ``normlab.export`` rely on):

- ``checkpoint["state_dict"]``: the averaged model, as the task's own state dict (same keys):
  averaged weights of the averaged networks, their norm buffers as ``norm_buffers`` says, and
  the raw model's other networks;
- ``checkpoint["current_model_state"]``: the raw model's state dict (what training continues
  from; ``resume_mode=weights`` loads this one);
- ``checkpoint["averaging_state"]``: ``{"n_averaged": tensor}``, the number of updates so far;
- ``checkpoint["callbacks"]["WeightEMA"]``: ``{"latest_update_step": int}``, the optimizer step
  of the last update;
- ``checkpoint["metric_states"]`` (``ExactResume``): the averaged copy's metric states too,
  under names starting with ``_ema/``.

A checkpoint written without the callback has only ``state_dict`` (the raw weights).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from normlab.callbacks.precise_bn import recompute_on_training_batches
from normlab.callbacks.statistics import running_statistics_layers
from normlab.errors import ConfigError
from normlab.norm import is_norm
from normlab.ranges import (
    COUNT,
    FRACTION,
    POSITIVE,
    SWITCH,
    ValueRange,
    check_choice,
    checked_arguments,
)
from normlab.tasks.base import Task

log = logging.getLogger(__name__)

NORM_BUFFERS = ("average", "copy", "recompute")
STEP = ValueRange(low=0, integer=True)


def averaged_networks(task: Task) -> list[str]:
    """The attributes of ``task`` holding the networks weight averaging averages; empty: the
    task names none (all of it is averaged)."""
    return list(task.averaged_network_names or task.network_names)


@checked_arguments(
    decay=FRACTION,
    decay_warmup=SWITCH,
    warmup_gamma=POSITIVE,
    warmup_power=POSITIVE,
    update_every_n_steps=COUNT,
    start_step=STEP,
    recompute_images=COUNT,
)
class WeightEMA(WeightAveraging):
    """An exponential moving average of the task's weights, evaluated beside them; see the
    module docstring for the schedule, the norm buffers and the checkpoint format."""

    def __init__(
        self,
        decay: float = 0.9998,
        decay_warmup: bool = True,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        update_every_n_steps: int = 1,
        start_step: int = 0,
        norm_buffers: str = "average",
        recompute_images: int = 1000,
    ) -> None:
        check_choice("norm_buffers", norm_buffers, NORM_BUFFERS)
        # copy and recompute: torch's AveragedModel copies the buffers at every update.
        super().__init__(use_buffers=norm_buffers == "average", multi_avg_fn=self._average)
        self.decay = decay
        self.decay_warmup = decay_warmup
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power
        self.update_every_n_steps = update_every_n_steps
        self.start_step = start_step
        self.norm_buffers = norm_buffers
        self.recompute_images = recompute_images
        # The fraction of the old average the update in progress keeps.
        self._kept = 0.0
        self._recomputed_at: int | None = None

    # -- the schedule ---------------------------------------------------------------------------

    def step_decay(self, step: int) -> float:
        """β of optimizer step ``step`` (counted as ``trainer.global_step`` after it)."""
        if not self.decay_warmup:
            return self.decay
        t = step - self.start_step - 1
        return min(self.decay, 1.0 - (1.0 + t / self.warmup_gamma) ** -self.warmup_power)

    def kept_fraction(self, last: int, step: int) -> float:
        """How much of the average an update at ``step`` keeps when the last was at ``last``
        (steps up to ``start_step`` have no decay: the average starts after them)."""
        first = max(last, self.start_step) + 1
        return math.prod(self.step_decay(u) for u in range(first, step + 1))

    @property
    def num_updates(self) -> int:
        """Updates made so far (torch's ``n_averaged``; 0 before setup)."""
        return 0 if self._average_model is None else int(self._average_model.n_averaged)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """After the optimizer step ``step_idx + 1``: the first step after ``start_step``, then
        once at least ``update_every_n_steps`` steps have passed since the last update; never at
        an epoch's end."""
        if step_idx is None:
            return False
        step = step_idx + 1
        if step <= self.start_step:
            return False
        return self.num_updates == 0 or step - self._latest_update_step >= self.update_every_n_steps

    @torch.no_grad()
    def _average(self, averaged: list[Tensor], current: list[Tensor], num_averaged: Any) -> None:
        """torch's EMA of one group of tensors (one device and dtype) with this update's decay;
        integer buffers (``num_batches_tracked``) are counts: copied."""
        if torch.is_floating_point(averaged[0]):
            get_ema_multi_avg_fn(self._kept)(averaged, current, num_averaged)
        else:
            torch._foreach_copy_(averaged, current)

    def _update_if_due(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step > self._latest_update_step and self.should_update(step_idx=step - 1):
            assert self._average_model is not None
            self._kept = self.kept_fraction(self._latest_update_step, step)
            self._average_model.update_parameters(pl_module)
            self._latest_update_step = step

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._update_if_due(trainer, pl_module)

    # -- the averaged copy ----------------------------------------------------------------------

    @property
    def averaged_task(self) -> Task | None:
        """The averaged copy of the task (None before setup)."""
        return None if self._average_model is None else self._average_model.module

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, Task):
            raise ConfigError(
                f"callbacks=ema: {type(pl_module).__name__} is not a normlab.tasks.Task, whose "
                "validation and test evaluate the averaged model beside it"
            )
        if stage == TrainerFn.FITTING or self._average_model is None:
            # On the training device, for it is built before the strategy moves the module: a
            # copy left on the CPU would cost a transfer per step.
            self._device = trainer.strategy.root_device
            # Lightning builds it for fit only; a test of a checkpoint needs it too, to load
            # the averaged weights into it and the raw ones into the task.
            super().setup(trainer, pl_module, TrainerFn.FITTING)
            averaged = self._average_model.module
            # In the training precision now, before a checkpoint is loaded into it: 64-true
            # weights loaded into a float32 copy would lose their low bits.
            self._average_model.module = trainer.precision_plugin.convert_module(averaged)
            self._say_what_norm_buffers_do(trainer, pl_module)
        pl_module.attach_averaged(self.averaged_task)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if isinstance(pl_module, Task):
            pl_module.attach_averaged(None)

    def _say_what_norm_buffers_do(self, trainer: pl.Trainer, pl_module: Task) -> None:
        if not trainer.is_global_zero:
            return
        with_statistics = running_statistics_layers(pl_module)
        without = [
            m for m in pl_module.modules() if is_norm(m) and m not in with_statistics.values()
        ]
        key = f"ema.norm_buffers={self.norm_buffers}"
        if not with_statistics:
            log.info(
                "%s: no norm of this model keeps running statistics (%d norm layers without): "
                "only the weights are averaged",
                key,
                len(without),
            )
            return
        log.info(
            "%s applies to the %d norm layers with running statistics%s",
            key,
            len(with_statistics),
            f"; the {len(without)} without them are unaffected" if without else "",
        )
        if trainer.world_size > 1 and self.norm_buffers != "recompute":
            log.info(
                "%s with %d processes: the averaged model takes rank 0's norm statistics (the "
                "same on every rank with a synchronised norm); norm_buffers=recompute merges "
                "every process's",
                key,
                trainer.world_size,
            )

    def _pairs(
        self, pl_module: Task, named: str, averaged_only: bool | None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """(averaged copy's tensor, raw tensor) of ``named`` ("parameters" or "buffers"),
        of the averaged networks (``averaged_only``), of the others (False) or all (None)."""
        prefixes = tuple(f"{name}." for name in averaged_networks(pl_module)) or ("",)
        raw = dict(getattr(pl_module, f"named_{named}")())
        for name, tensor in getattr(self.averaged_task, f"named_{named}")():
            if averaged_only is None or name.startswith(prefixes) == averaged_only:
                yield tensor, raw[name]

    @torch.no_grad()
    def _refresh(self, pl_module: Task) -> None:
        """Give the averaged copy what it takes from the raw model: everything before the first
        update, the networks it does not average, and with ``copy`` the norm buffers."""
        if self.num_updates == 0:
            pairs = [
                *self._pairs(pl_module, "parameters", None),
                *self._pairs(pl_module, "buffers", None),
            ]
        else:
            pairs = [
                *self._pairs(pl_module, "parameters", False),
                *self._pairs(pl_module, "buffers", None if self.norm_buffers == "copy" else False),
            ]
        for averaged, raw in pairs:
            averaged.copy_(raw)

    def _broadcast_buffers(self) -> None:
        """Rank 0's buffers of the averaged copy on every process."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        for buffer in self.averaged_task.buffers():
            dist.broadcast(buffer, src=0)

    def _recompute(self, trainer: pl.Trainer, pl_module: Task) -> None:
        averaged = self.averaged_task
        networks = averaged_networks(pl_module)
        loader = trainer.train_dataloader
        per_batch = (getattr(loader, "batch_size", None) or 1) * trainer.world_size
        averaged.eval()  # the networks not averaged run as at inference, leaving their buffers
        result = recompute_on_training_batches(
            trainer,
            averaged,
            nn.ModuleList(getattr(averaged, name) for name in networks) if networks else averaged,
            math.ceil(self.recompute_images / per_batch),
            "ema.norm_buffers=recompute",
        )
        self._recomputed_at = trainer.global_step
        if trainer.is_global_zero and result.updated:
            log.info(
                "ema: recomputed the averaged model's statistics of %d norm layers from %d "
                "batches (%d images)",
                len(result.updated),
                result.num_batches,
                result.num_batches * per_batch,
            )

    def _prepare(self, trainer: pl.Trainer, pl_module: Task, *, recompute: bool) -> None:
        """Make the averaged copy what is evaluated or kept: refreshed from the raw model, its
        statistics recomputed if asked (once per optimizer step: the weights it has), and the same on every process."""
        self._refresh(pl_module)
        if (
            recompute
            and self.norm_buffers == "recompute"
            and self._recomputed_at != trainer.global_step
        ):
            self._recompute(trainer, pl_module)
        self._broadcast_buffers()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        self._prepare(trainer, pl_module, recompute=fitting)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The statistics are those of the checkpoint tested (recomputed when it was saved).
        self._prepare(trainer, pl_module, recompute=False)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Nothing: Lightning's swap of the averaged weights into the task is not needed, the
        task evaluates the copy itself."""

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Nothing (no swap to undo)."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The end of training (and of an epoch without validation) is one of the moments the
        # statistics are recomputed: last.ckpt, written when training ends, holds them.
        self._prepare(trainer, pl_module, recompute=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The raw weights stay the task's (Lightning copies the averaged ones into it); the
        averaged copy is made final (a ``max_steps`` run may end inside an epoch)."""
        self._prepare(trainer, pl_module, recompute=True)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._average_model is not None:
            # A checkpoint of step k holds the average updated with step k's weights, whether
            # the callback that saves it (last.ckpt every step) runs before this one or after;
            # Lightning took this callback's state (the last update's step) before this hook.
            self._update_if_due(trainer, pl_module)
            if self.state_key in checkpoint.get("callbacks", {}):
                checkpoint["callbacks"][self.state_key] = self.state_dict()
            self._refresh(pl_module)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
