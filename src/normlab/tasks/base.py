"""What every task module offers the callbacks and entry points that drive it.

A task is a LightningModule built from Hydra configs. Besides Lightning's hooks, the code above
the tasks layer relies on seven things, declared here so that it can call them instead of
probing for them:

- :attr:`Task.batch_format`: what the batches it takes hold, matched against the data module's
  own ``batch_format`` before a checkpoint is evaluated or exported (``normlab.runs``);
- :meth:`Task.logged_metrics`: the metric names the task logs, checked against
  ``monitor.metric`` and ``optimized_metric`` before a run starts (``normlab.validation``);
- :meth:`Task.check_run`: refuse Trainer options or data the task cannot work with
  (``normlab.train``);
- :meth:`Task.forward_for_norm_statistics`: run the networks on a training batch
  (``normlab.callbacks.precise_bn``);
- :meth:`Task.inference_network`: the network to export and its input (``normlab.export``);
- :meth:`Task.compile_networks`: ``torch.compile`` the networks it trains (``compile=true``);
- :meth:`Task.evaluated_models`: the models validation and test evaluate, the task itself and,
  with weight averaging (``callbacks=ema``, :class:`~normlab.callbacks.WeightEMA`), its averaged
  copy, whose metrics carry :data:`AVERAGED_SUFFIX` (``val/acc_ema`` beside ``val/acc``).

Every task also evaluates (validation and test) with the norm statistics
:attr:`Task.eval_norm_statistics` names (``task.eval_norm_statistics``; ``normlab.eval`` sets it
from its ``norm_statistics``): ``population``, those stored in training, or ``batch``, each
evaluation batch's own (:func:`normlab.norm.batch_statistics`).
"""

from __future__ import annotations

import inspect
import logging
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from contextlib import ExitStack
from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from normlab.errors import ConfigError
from normlab.models.compile_regions import compile_repeated_blocks
from normlab.norm import NORM_STATISTICS, batch_statistics
from normlab.ranges import check_choice
from normlab.tasks.guard import LossGuard

log = logging.getLogger(__name__)

# What the names of the averaged model's metrics end with: val/acc_ema beside val/acc.
AVERAGED_SUFFIX = "_ema"
# The stages whose metrics are logged for both models (training is the raw model's alone).
EVALUATION_STAGES = ("val/", "test/")


def take_values(metrics: MetricCollection | Metric) -> Any:
    """What ``metrics`` computes over the epoch; their states are reset for the next."""
    values = metrics.compute()
    metrics.reset()
    return values


class Task(pl.LightningModule, ABC):
    """The base of the task modules: saves the subclass's ``__init__`` arguments as
    hyperparameters, sets up the non-finite loss policy (``loss_guard``) and evaluates with the
    norm statistics ``eval_norm_statistics`` names (``population`` or ``batch``).

    The hyperparameters hold the Hydra configs resolved to plain dicts (``${norm}`` replaced by
    its value), so ``load_from_checkpoint(path)`` rebuilds the module from the checkpoint alone.
    """

    # What the batches this task takes hold, in the words data modules declare theirs with
    # (their batch_format): a checkpoint is evaluated only on data of that kind.
    batch_format: str = ""
    # Names of the optimizers in the order configure_optimizers returns them, for callbacks that
    # log one curve per optimizer; empty: number them.
    optimizer_names: tuple[str, ...] = ()
    # Attributes holding the networks it trains: what ``compile=true`` compiles.
    network_names: tuple[str, ...] = ()
    # The networks weight averaging averages (empty: all of network_names); in the averaged copy
    # the others are the live ones (a GAN's discriminator, which inference does not run).
    averaged_network_names: tuple[str, ...] = ()
    # Weight averaging's copy of this task (attach_averaged), evaluated beside it.
    _averaged: Task | None = None

    def __init__(
        self,
        on_nonfinite_loss: str = "stop",
        max_nonfinite_fraction: float = 0.25,
        eval_norm_statistics: str = "population",
    ) -> None:
        super().__init__()
        # Lightning reads the arguments from the frame it is given: the subclass's __init__,
        # which called this one.
        self.save_hyperparameters(logger=False, frame=inspect.currentframe().f_back)
        for name, value in self.hparams.items():
            if isinstance(value, DictConfig):
                self.hparams[name] = OmegaConf.to_container(value, resolve=True)
        self.loss_guard = LossGuard(on_nonfinite_loss, max_nonfinite_fraction)
        self.eval_norm_statistics = check_choice(
            "eval_norm_statistics", eval_norm_statistics, NORM_STATISTICS
        )
        self._evaluation_statistics = ExitStack()
        self._batch_statistics_logged = False

    # Lightning puts the module in eval mode before these hooks return and restores each
    # submodule's mode after the loop; the norms' switch sits inside, undone at the loop's end.
    def on_validation_model_eval(self) -> None:
        super().on_validation_model_eval()
        self._enter_eval_norm_statistics(self.trainer.val_dataloaders)

    def on_test_model_eval(self) -> None:
        super().on_test_model_eval()
        self._enter_eval_norm_statistics(self.trainer.test_dataloaders)

    def on_validation_end(self) -> None:
        self._evaluation_statistics.close()

    def on_test_end(self) -> None:
        self._evaluation_statistics.close()

    def _enter_eval_norm_statistics(self, loaders: Any) -> None:
        if self._averaged is not None:
            self._averaged.eval()  # Lightning sets the modes of this task only
        if self.eval_norm_statistics != "batch":
            return
        if self._averaged is not None:
            self._evaluation_statistics.enter_context(batch_statistics(self._averaged))
        layers = self._evaluation_statistics.enter_context(batch_statistics(self))
        if self._batch_statistics_logged or not self.trainer.is_global_zero:
            return
        self._batch_statistics_logged = True
        if not layers:
            log.info(
                "norm statistics: batch; no norm of %s keeps statistics from training, so batch "
                "and population statistics evaluate alike",
                type(self).__name__,
            )
            return
        kinds = Counter(type(layer).__name__ for layer in layers.values())
        batch_size = getattr(loaders, "batch_size", None)
        log.info(
            "norm statistics: batch; %d norm layers (%s) normalise each evaluation batch%s with "
            "its own statistics as in training, their running statistics untouched; every other "
            "layer (dropout, ...) in eval mode",
            len(layers),
            ", ".join(f"{kind} ×{count}" for kind, count in kinds.items()),
            f" ({batch_size} images per process)" if batch_size else "",
        )

    def on_train_epoch_end(self) -> None:
        self.loss_guard.check_skipped_fraction()

    def on_train_end(self) -> None:
        self.loss_guard.check_skipped_fraction()  # a max_steps run that ends mid-epoch

    @classmethod
    @abstractmethod
    def logged_metrics(cls) -> list[str]:
        """Every metric name the task logs (what ``monitor.metric`` and ``optimized_metric`` may
        name). A task whose names depend on its options takes them as keyword arguments with
        defaults, named as in its config (``normlab.validation`` passes those it can read)."""

    def check_run(self, trainer: pl.Trainer, datamodule: pl.LightningDataModule | None) -> None:
        """Raise :class:`~normlab.errors.ConfigError`, naming the config key, for Trainer options
        or data the task cannot work with; called once both are built, before fitting. A task
        that knows its input's size from the data also sets ``example_input_array`` (one sample)
        here, so that the model summary reports FLOPs and sizes. By default there is nothing to
        check."""

    def set_example_input(self, example: Any, trainer: pl.Trainer | None) -> None:
        """Give the model summary one input to count FLOPs with, in the dtype the Trainer's
        precision gives real inputs (float64 under ``64-true``): Lightning's summary feeds
        ``example_input_array`` as it is."""
        if trainer is not None:
            example = trainer.precision_plugin.convert_input(example)
        self.example_input_array = example

    def compile_networks(self, mode: str, regional: bool = False) -> None:
        """``torch.compile`` each network in :attr:`network_names` in place
        (``nn.Module.compile``): unlike wrapping it, this leaves the module tree, and so the
        state dict's keys, those of the uncompiled network, so checkpoints load either way.
        ``regional``: compile each repeated block on its own instead
        (:mod:`normlab.models.compile_regions`)."""
        if not self.network_names:
            raise ConfigError(
                f"compile=true: {type(self).__name__} names no networks to compile "
                "(network_names); run it with compile=false"
            )
        for name in self.network_names:
            network = getattr(self, name)
            if regional:
                compile_repeated_blocks(network, mode=mode)
            else:
                network.compile(mode=mode)

    @classmethod
    def averaged_metrics(cls, names: list[str]) -> list[str]:
        """The names the averaged model's metrics are logged under, for the validation and test
        metrics among ``names``."""
        return [name + AVERAGED_SUFFIX for name in names if name.startswith(EVALUATION_STAGES)]

    def attach_averaged(self, averaged: Task | None) -> None:
        """Evaluate ``averaged`` (a copy of this task holding averaged weights) beside this
        task from now on; None: this task alone."""
        # Not a submodule: its weights stay out of this task's state_dict, optimizer and DDP.
        object.__setattr__(self, "_averaged", averaged)

    @property
    def averaged(self) -> Task | None:
        """The attached averaged copy, or None."""
        return self._averaged

    def evaluated_models(self) -> list[tuple[str, Task]]:
        """What validation and test evaluate, each with the suffix of its metric names: this
        task (``""``) and, while one is attached, its averaged copy (:data:`AVERAGED_SUFFIX`),
        which evaluation puts in eval mode and normalises with the statistics this task's
        ``eval_norm_statistics`` names. Each model's metric objects are its own attributes (the
        copy has its own ``val_metrics``, ``val_acc_best``, ...); this task logs them all."""
        if self._averaged is None:
            return [("", self)]
        return [("", self), (AVERAGED_SUFFIX, self._averaged)]

    def log_evaluation(
        self,
        compute: Callable[[Task], Mapping[str, Tensor]],
        best_of: str | None = None,
        prog_bar: Collection[str] = (),
    ) -> None:
        """At the end of a validation or test epoch, log for every evaluated model the values
        ``compute(model)`` gives (read from, and resetting, that model's metrics) under their
        names plus the model's suffix. ``best_of`` (``val/acc``): also update the model's best-of
        tracker (its attribute ``val_acc_best``) with that value and log it (``val/acc_best``),
        after real validations only: the sanity check's batches are no validation. ``prog_bar``:
        the names shown in the progress bar (this model's only)."""
        for suffix, task in self.evaluated_models():
            values = compute(task)
            for name, value in values.items():
                shown = name in prog_bar and not suffix
                self.log(name + suffix, value, prog_bar=shown, sync_dist=True)
            if best_of is None or self.trainer.sanity_checking:
                continue
            tracker = getattr(task, best_of.replace("/", "_") + "_best")
            tracker.update(values[best_of])
            shown = f"{best_of}_best" in prog_bar and not suffix
            self.log(f"{best_of}_best{suffix}", tracker.compute(), prog_bar=shown, sync_dist=True)

    @abstractmethod
    def forward_for_norm_statistics(self, batch: Any) -> None:
        """Run the task's networks on a training batch as it comes from the loader, for
        callbacks that measure or recompute norm statistics; they set the modes and disable
        gradients."""

    @abstractmethod
    def inference_network(self, batch: Any) -> tuple[nn.Module, tuple[Tensor, ...]]:
        """The network to export and its positional inputs for ``batch``."""
