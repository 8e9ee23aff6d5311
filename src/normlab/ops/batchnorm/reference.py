"""cuda_bn's specification in plain PyTorch (autograd does the backward).

``backend=reference`` runs this; the tests hold the Triton kernels to it and both to
``nn.BatchNorm2d``. It states the semantics in one place: batch statistics in fp32 (fp64 for fp64
input), biased variance for normalising and unbiased for the running estimate, and an activation
applied to the affine output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from normlab.ops.bn_stats import unbiased_variance, update_running_stats


def activate(z: Tensor, activation: str | None, negative_slope: float) -> Tensor:
    """The activations cuda_bn can fuse (not in place: the reference keeps autograd simple)."""
    if activation is None:
        return z
    if activation == "relu":
        return F.relu(z)
    if activation == "leaky_relu":
        return F.leaky_relu(z, negative_slope)
    if activation == "silu":
        return F.silu(z)
    raise ValueError(f"unknown activation {activation!r}; allowed: relu, leaky_relu, silu, None")


def batch_norm_reference(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    use_batch_stats: bool,
    momentum: float,
    eps: float,
    activation: str | None = None,
    negative_slope: float = 0.01,
) -> Tensor:
    """act(BN(x)) for N×C×* input; updates the running statistics in place when batch statistics
    are used and running buffers are given (and the batch is not empty)."""
    channels = x.shape[1]
    reduce_dims = [0, *range(2, x.dim())]
    shape = [1, channels] + [1] * (x.dim() - 2)
    acc = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    count = x.numel() // max(channels, 1)
    if use_batch_stats and count > 0:
        mean = acc.mean(reduce_dims)
        var = acc.var(reduce_dims, unbiased=False)
        unbiased = unbiased_variance(var.detach(), count)
        update_running_stats(running_mean, running_var, mean.detach(), unbiased, momentum)
    elif use_batch_stats:  # an empty batch: nothing to normalise, statistics untouched
        mean, var = acc.new_zeros(channels), acc.new_ones(channels)
    else:
        mean, var = running_mean.to(acc.dtype), running_var.to(acc.dtype)
    z = (acc - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)
    if weight is not None:
        z = z * weight.to(acc.dtype).view(shape)
    if bias is not None:
        z = z + bias.to(acc.dtype).view(shape)
    return activate(z, activation, negative_slope).to(x.dtype)
