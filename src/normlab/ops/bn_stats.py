"""BatchNorm's statistics bookkeeping in plain PyTorch, one copy for every BatchNorm here
(syncbn, and cuda_bn's native, reference and synchronised paths): the running-average factor of
a training step, the running-statistics update, and the refusal of a synchronised batch too
small to have a variance."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def step_momentum(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """Count a training step of ``bn`` and return the running-statistics factor for it, as
    ``nn.BatchNorm2d`` does (``momentum=None``: a cumulative average over the steps)."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    return momentum


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
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        running_var.lerp_(unbiased_var.to(running_var.dtype), momentum)


def require_two_values(total: int) -> None:
    """Refuse a synchronised batch with fewer than two values per channel, as BatchNorm refuses
    a local one. Every process sees the same total, so all of them raise: none is left waiting
    in a collective."""
    if total < 2:
        raise ValueError(
            "Expected more than 1 value per channel when training, got "
            f"{total} across the synchronised processes"
        )
