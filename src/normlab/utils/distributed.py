"""Multi-process training glue for the entry points: which rank we are, one config for all ranks,
and a global batch size split over processes (the process groups of synchronised norms are the
norm layer's own: ``normlab.ops.sync_collectives``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from normlab.errors import ConfigError

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
