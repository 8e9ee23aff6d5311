"""Optimizer and scheduler helpers shared by the task modules."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from torch import nn


def parameter_groups(
    model: nn.Module, weight_decay: float, decay_norm_and_bias: bool
) -> list[dict[str, Any]]:
    """Split parameters so that 1-D tensors (norm affine weights, biases, layer scales) skip decay.

    Decaying norm scales pulls them towards zero, which in a norm study would confound the norm
    being compared with the regulariser; most reference recipes (timm, ConvNeXt) exclude them.

    The same split as timm's ``param_groups_weight_decay``, but not its groups: timm orders them
    no-decay first, drops empty ones and merges both when ``weight_decay`` is 0. Optimizer states
    load into groups by position, so a checkpoint's state would land in the wrong groups; the
    groups here stay [decay, no-decay], as every checkpoint so far has them.
    """
    if decay_norm_and_bias:
        return [
            {
                "params": [p for p in model.parameters() if p.requires_grad],
                "weight_decay": weight_decay,
            }
        ]
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    # Named: LearningRateMonitor's curves are lr-<optimizer>/decay and /no_decay, not /pg1, /pg2.
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(
    config: Mapping[str, Any], model: nn.Module, decay_norm_and_bias: bool
) -> torch.optim.Optimizer:
    """Instantiate a ``_partial_`` optimizer config over the model's parameter groups."""
    factory: Callable[..., torch.optim.Optimizer] = instantiate(config)
    weight_decay = float(config.get("weight_decay", 0.0))
    return factory(parameter_groups(model, weight_decay, decay_norm_and_bias))


def build_scheduler(
    config: Mapping[str, Any] | None, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Instantiate a ``_partial_`` scheduler config; ``total_steps`` is supplied when it takes one.

    Schedules such as OneCycleLR need the run's length, which only the Trainer knows.
    """
    if not config:
        return None
    factory = instantiate(config)
    target = getattr(factory, "func", factory)
    accepts_total = "total_steps" in inspect.signature(target).parameters
    if accepts_total and "total_steps" not in getattr(factory, "keywords", {}):
        return factory(optimizer, total_steps=total_steps)
    return factory(optimizer)


def configure_optimization(
    module: pl.LightningModule, model: nn.Module, decay_norm_and_bias: bool
) -> dict[str, Any]:
    """``configure_optimizers`` for modules whose hparams hold ``optimizer``, ``scheduler`` and
    ``scheduler_interval`` configs."""
    hparams = module.hparams
    optimizer = build_optimizer(hparams.optimizer, model, decay_norm_and_bias)
    total_steps = int(module.trainer.estimated_stepping_batches)
    scheduler = build_scheduler(hparams.get("scheduler"), optimizer, total_steps)
    if scheduler is None:
        return {"optimizer": optimizer}
    interval = hparams.get("scheduler_interval", "step")
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}


def warmup_multistep(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    milestones: Sequence[float] = (2 / 3, 11 / 12),
    gamma: float = 0.1,
    warmup_steps: int = 500,
    warmup_factor: float = 0.001,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from ``warmup_factor``·lr over ``warmup_steps``, then ×``gamma`` at each
    milestone, given as a fraction of the run (the detection "1x" schedule decays at 8/12 and
    11/12 of its 12 epochs), so one config serves runs of any length. Step it every batch."""
    if any(not 0.0 < m < 1.0 for m in milestones):
        raise ValueError(f"milestones are fractions of the run in (0, 1), got {list(milestones)}")
    boundaries = sorted(math.floor(m * total_steps) for m in milestones)
    warmup_steps = min(warmup_steps, total_steps)

    def factor(step: int) -> float:
        decay = gamma ** sum(step >= boundary for boundary in boundaries)
        if step < warmup_steps:
            alpha = step / warmup_steps
            return decay * (warmup_factor * (1 - alpha) + alpha)
        return decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
