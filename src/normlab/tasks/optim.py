"""Optimizer and scheduler construction shared by the task modules."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn


def parameter_groups(
    model: nn.Module, weight_decay: float, decay_norm_and_bias: bool
) -> list[dict[str, Any]]:
    """Split parameters so that 1-D tensors (norm affine weights, biases, layer scales) skip decay.

    Decaying norm scales pulls them towards zero, which in a norm study would confound the norm
    being compared with the regulariser; most reference recipes (timm, ConvNeXt) exclude them.
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
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
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
