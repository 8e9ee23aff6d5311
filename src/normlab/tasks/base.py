"""What every task module offers the callbacks and entry points that drive it.

A task is a LightningModule built from Hydra configs. Besides Lightning's hooks, the code above
the tasks layer relies on six things, declared here so that it can call them instead of
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
- :meth:`Task.compile_networks`: ``torch.compile`` the networks it trains (``compile=true``).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from normlab.errors import ConfigError
from normlab.models.compile_regions import compile_repeated_blocks
from normlab.tasks.guard import LossGuard


class Task(pl.LightningModule, ABC):
    """The base of the task modules: saves the subclass's ``__init__`` arguments as
    hyperparameters and sets up the non-finite loss policy (``loss_guard``).

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

    def __init__(
        self, on_nonfinite_loss: str = "stop", max_nonfinite_fraction: float = 0.25
    ) -> None:
        super().__init__()
        # Lightning reads the arguments from the frame it is given: the subclass's __init__,
        # which called this one.
        self.save_hyperparameters(logger=False, frame=inspect.currentframe().f_back)
        for name, value in self.hparams.items():
            if isinstance(value, DictConfig):
                self.hparams[name] = OmegaConf.to_container(value, resolve=True)
        self.loss_guard = LossGuard(on_nonfinite_loss, max_nonfinite_fraction)

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

    @abstractmethod
    def forward_for_norm_statistics(self, batch: Any) -> None:
        """Run the task's networks on a training batch as it comes from the loader, for
        callbacks that measure or recompute norm statistics; they set the modes and disable
        gradients."""

    @abstractmethod
    def inference_network(self, batch: Any) -> tuple[nn.Module, tuple[Tensor, ...]]:
        """The network to export and its positional inputs for ``batch``."""
