"""The layers of a model that keep running statistics, and the statistics of one input of such
a layer.

Shared by :class:`~normlab.callbacks.PreciseBN` (which averages them) and
:class:`~normlab.callbacks.NormStatistics` (which compares them with the running ones). The
statistic of one call is the layer's own notion of "batch statistics", the quantity its running
estimate tracks:

- BatchNorm-like layers (``nn.BatchNorm*``, torch's and normlab's ``SyncBatchNorm``,
  ``CudaBatchNorm``, ``FrozenBatchNorm2d``): per channel, the mean and the *unbiased* variance
  over every value of the channel in the batch (N·H·W values), as torch's running update uses.
- InstanceNorm with ``track_running_stats=True``: per channel, the mean over the batch's
  instances of each instance's mean and unbiased variance (over H·W), as torch's update does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from normlab.norm import has_running_statistics, is_norm, layer_traits
from normlab.ops.bn_stats import unbiased_variance


def running_statistics_layers(model: nn.Module, *, frozen: bool = False) -> dict[str, nn.Module]:
    """``{name: layer}`` for every layer of ``model`` with running statistics, each module once
    (``frozen``: also norms whose statistics are fixed buffers, as ``FrozenBatchNorm2d``'s)."""
    return {
        name: module
        for name, module in model.named_modules()
        if has_running_statistics(module) or (frozen and _has_fixed_statistics(module))
    }


def _has_fixed_statistics(module: nn.Module) -> bool:
    fixed = (getattr(module, name, None) for name in ("running_mean", "running_var"))
    return is_norm(module) and all(isinstance(tensor, Tensor) for tensor in fixed)


def per_sample_statistics(module: nn.Module) -> bool:
    """True for InstanceNorm: a norm that keeps running statistics but normalises with no batch
    statistics tracks an average of per-instance statistics."""
    traits = layer_traits(module)
    return traits is not None and traits.running_statistics and not traits.batch_statistics


@dataclass
class Moments:
    """The statistics of one input of a norm layer, per channel (all tensors C, float64).

    ``count``: values per channel for BatchNorm-like layers (N·H·W), instances for InstanceNorm.
    ``mean``: the batch mean. ``var``: the unbiased batch variance (BatchNorm-like: over the
    ``count`` values; InstanceNorm: the mean of the instances' unbiased variances).
    """

    count: int
    mean: Tensor
    var: Tensor


def input_moments(module: nn.Module, x: Tensor) -> Moments:
    """The batch statistics ``module`` computes from its input ``x`` (N×C×…), in float64.

    The reduction is BatchNorm's own statistics kernel (``torch.batch_norm_update_stats``: one
    pass, accumulated in float64 for float64 input, about three times faster than
    ``torch.var_mean`` over N·H·W on CPU) in ``x``'s dtype, at least float32.
    """
    values = x.detach()
    if values.dtype not in (torch.float32, torch.float64):
        values = values.float()
    channels = values.shape[1]
    if values.shape[0] == 0:  # an empty batch (a process of an uneven split) weighs nothing
        zeros = values.new_zeros(channels, dtype=torch.float64)
        return Moments(0, zeros, zeros.clone())
    if per_sample_statistics(module):
        # Every (instance, channel) pair is a "channel" of one batch: N·C rows of H·W values.
        rows = values.reshape(1, values.shape[0] * channels, -1)
        mean, var = torch.batch_norm_update_stats(rows, None, None, 0.0)
        size = rows.shape[2]
        unbiased = unbiased_variance(var.double(), size)
        instances = values.shape[0]
        return Moments(
            instances,
            mean.double().view(instances, channels).mean(0),
            unbiased.view(instances, channels).mean(0),
        )
    count = values.numel() // channels
    mean, var = torch.batch_norm_update_stats(values, None, None, 0.0)
    return Moments(count, mean.double(), unbiased_variance(var.double(), count))
