"""BatchNorm's statistics bookkeeping in plain PyTorch, one copy for every BatchNorm here
(syncbn, cuda_bn's native, reference and synchronised paths, and the small-batch norms brn,
ghost_bn and evonorm_b0): the running-average factor of a training step, the unbiased variance
and the running-statistics update, and the refusal of a synchronised batch too small to have a
variance."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def step_momentum(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """Count a training step of ``bn`` and return the running-statistics factor for it, as
    ``nn.BatchNorm2d`` does (``momentum=None``: a cumulative average over the steps)."""
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        return count_training_step(bn.num_batches_tracked, bn.momentum)
    return 0.0 if bn.momentum is None else bn.momentum


def count_training_step(num_batches_tracked: Tensor, momentum: float | None) -> float:
    """Add one training step to ``num_batches_tracked`` and return the running-average factor
    for it: ``momentum``, or 1/steps for a cumulative average (``momentum=None``)."""
    num_batches_tracked.add_(1)
    return 1.0 / float(num_batches_tracked) if momentum is None else momentum


def unbiased_variance(biased_var: Tensor, count: int) -> Tensor:
    """The unbiased variance of ``count`` values from their biased one (Bessel's correction;
    a single value keeps its variance of 0), the estimate BatchNorm keeps as ``running_var``."""
    return biased_var * (count / max(count - 1, 1))


@torch.no_grad()
def update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    unbiased_var: Tensor,
    momentum: float,
) -> None:
    """Move the running estimates towards a batch's mean and unbiased variance (if tracked)."""
    if running_mean is not None and running_var is not None:
        update_running_average(running_mean, mean, momentum)
        update_running_average(running_var, unbiased_var, momentum)


@torch.no_grad()
def update_running_average(running: Tensor, batch: Tensor, momentum: float) -> None:
    """Move one running estimate towards a batch's value, in the estimate's dtype."""
    running.lerp_(batch.to(running.dtype), momentum)


def require_two_values(total: int) -> None:
    """Refuse a synchronised batch with fewer than two values per channel, as BatchNorm refuses
    a local one. Every process sees the same total, so all of them raise: none is left waiting
    in a collective."""
    if total < 2:
        raise ValueError(
            "Expected more than 1 value per channel when training, got "
            f"{total} across the synchronised processes"
        )
