"""Multi-process training glue: which rank we are, one config for all ranks, BN synchronisation
through our own Lightning layer-sync plugin, and a global batch size split over processes."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.plugins.layer_sync import LayerSync
from omegaconf import DictConfig, OmegaConf
from torch import nn

from normlab.errors import ConfigError
from normlab.norm.sync import SyncBatchNorm

# Set by rank 0 before Lightning launches the other processes (they inherit the environment), so
# every rank runs with rank 0's resolved config: interpolations such as timestamps resolve once.
RUN_CONFIG_ENV = "NORMLAB_RUN_CONFIG"


def is_rank_zero() -> bool:
    return rank_zero_only.rank == 0


def publish_run_config(path: Path) -> None:
    os.environ[RUN_CONFIG_ENV] = str(path)


def inherited_run_config() -> DictConfig | None:
    """Rank 0's resolved config in a process Lightning launched for another rank, else None."""
    path = os.environ.get(RUN_CONFIG_ENV)
    if is_rank_zero() or not path:
        return None
    return OmegaConf.load(path)


class NormSync(LayerSync):
    """``trainer.sync_batchnorm=true``: every BatchNorm-like layer becomes our
    :class:`~normlab.norm.SyncBatchNorm` (CPU and CUDA), never torch's CPU-refusing class.

    A norm class can provide its own synchronised form with a ``to_synchronised(group_size)``
    method and undo it with ``to_unsynchronised()`` (cuda_bn turns its sync mode on, so it is
    never replaced by another class); FrozenBatchNorm2d has no batch statistics
    and is left alone. :meth:`revert` restores the original classes.
    """

    def __init__(self, group_size: int | None = None) -> None:
        self.group_size = group_size

    def _convert(self, module: nn.Module) -> nn.Module:
        if hasattr(module, "to_synchronised"):
            return module.to_synchronised(self.group_size)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
            module, SyncBatchNorm
        ):
            sync = SyncBatchNorm.from_batchnorm(module, group_size=self.group_size)
            sync.original_class = type(module)
            return sync
        for name, child in module.named_children():
            module.add_module(name, self._convert(child))
        return module

    def apply(self, model: nn.Module) -> nn.Module:
        return self._convert(model)

    def revert(self, model: nn.Module) -> nn.Module:
        if hasattr(model, "to_unsynchronised"):
            return model.to_unsynchronised()
        original = getattr(model, "original_class", None)
        if isinstance(model, SyncBatchNorm) and original is not None:
            plain = original(
                model.num_features,
                model.eps,
                model.momentum,
                model.affine,
                model.track_running_stats,
            )
            plain.load_state_dict(model.state_dict())
            plain.to(device=model.running_mean.device if model.running_mean is not None else "cpu")
            plain.train(model.training)
            return plain
        for name, child in model.named_children():
            model.add_module(name, self.revert(child))
        return model


def world_size(trainer_cfg: DictConfig) -> int:
    """Processes the Trainer config asks for (devices × nodes), before anything is launched."""
    devices = trainer_cfg.get("devices", 1)
    nodes = int(trainer_cfg.get("num_nodes", 1) or 1)
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        count = len(devices)
    elif devices in (-1, "-1", "auto"):
        accelerator = trainer_cfg.get("accelerator", "cpu")
        count = torch.cuda.device_count() if accelerator in ("gpu", "cuda") else 1
    else:
        count = int(devices)
    return max(1, count) * nodes


def split_global_batch(cfg: DictConfig) -> None:
    """``data.global_batch_size``: set the per-process ``data.batch_size`` from it, or refuse."""
    global_batch = cfg.data.get("global_batch_size")
    if global_batch is None:
        return
    processes = world_size(cfg.trainer)
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
        raise ConfigError(f"data.global_batch_size must be a positive integer, got {global_batch}")
    if global_batch % processes:
        raise ConfigError(
            f"data.global_batch_size={global_batch} does not divide by the {processes} processes "
            f"of this run (trainer.devices × trainer.num_nodes); use a multiple of {processes} "
            "or set data.batch_size (per process) instead"
        )
    cfg.data.batch_size = global_batch // processes
