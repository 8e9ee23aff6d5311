"""The collectives of synchronised BatchNorm, in plain PyTorch on every backend (gloo on CPU, NCCL
on CUDA): the process groups a synchronised norm shares statistics in, and training-mode BN over
their union. syncbn runs it, and so does cuda_bn with ``sync`` on when its Triton kernels are not
used.

- forward: each process computes its per-channel count, mean and sum of squared deviations (M2);
  one all-gather shares them and every process merges them exactly (Chan et al.'s parallel
  variance), so uneven and empty per-process batches weigh correctly. Running statistics use the
  unbiased variance of the merged batch.
- backward: one all-reduce of the per-channel Σdy and Σdy·x̂ gives every process the input gradient
  of the big batch. Weight and bias gradients stay local (Σ over the process's own samples); DDP's
  gradient averaging then scales them like every other parameter.

Every process joins both collectives in every training step, including a process whose batch is
empty.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import FunctionCtx

from normlab.ops.bn_stats import require_two_values, update_running_stats
from normlab.ranges import ArgumentError

# (world size, group size) → this rank's process group; every rank creates every group once, in
# the same order, as torch.distributed requires.
_GROUPS: dict[tuple[int, int], Any] = {}


def process_group_for(group_size: int | None) -> Any:
    """The process group synchronising this rank: all ranks (``None``), or consecutive blocks
    of ``group_size`` ranks (apex's ``bn_group``); ``None`` when not running distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    if group_size is None or group_size >= world:
        return dist.group.WORLD
    if world % group_size:
        raise ArgumentError(
            "group_size",
            group_size,
            f"{{key}}={group_size} does not divide the {world} processes of this run",
        )
    key = (world, group_size)
    if key not in _GROUPS:
        _GROUPS[key], _ = dist.new_subgroups(group_size)
    return _GROUPS[key]


def sync_group(process_group: Any = None, group_size: int | None = None) -> Any:
    """The group a synchronised norm shares batch statistics with: ``process_group`` if given,
    else that of :func:`process_group_for` (all ranks by default); ``None`` when this process has
    no one to share with."""
    group = process_group or process_group_for(group_size)
    return group if group is not None and dist.get_world_size(group) > 1 else None


def _per_channel(x: Tensor) -> Tensor:
    """N×C×* → C×M (all values of each channel in a row)."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        group: Any,
        stats_dtype: torch.dtype,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        channels = x.shape[1]
        values = _per_channel(x).to(stats_dtype)
        count = values.new_full((channels,), values.shape[1])
        if values.shape[1]:
            mean = values.mean(dim=1)
            m2 = ((values - mean[:, None]) ** 2).sum(dim=1)
        else:
            mean = values.new_zeros(channels)
            m2 = values.new_zeros(channels)
        local = torch.stack([count, mean, m2])  # 3×C
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
        counts, means, m2s = torch.stack(gathered).unbind(dim=1)  # each P×C
        total = counts.sum(dim=0)
        require_two_values(int(total.min()))
        global_mean = (counts * means).sum(dim=0) / total
        global_m2 = (m2s + counts * (means - global_mean) ** 2).sum(dim=0)
        invstd = torch.rsqrt(global_m2 / total + eps)

        shape = [1, channels] + [1] * (x.dim() - 2)
        x_hat = (x.to(stats_dtype) - global_mean.view(shape)) * invstd.view(shape)
        out = x_hat
        if weight is not None:
            out = out * weight.to(stats_dtype).view(shape)
        if bias is not None:
            out = out + bias.to(stats_dtype).view(shape)
        ctx.save_for_backward(x_hat, weight, invstd, total)
        ctx.group = group
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(global_mean, global_m2, total)
        return out.to(x.dtype), global_mean, global_m2, total

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        x_hat, weight, invstd, total = ctx.saved_tensors
        channels = x_hat.shape[1]
        dy = _per_channel(grad_out).to(x_hat.dtype)
        xh = _per_channel(x_hat)
        local_sum_dy = dy.sum(dim=1)
        local_sum_dy_xhat = (dy * xh).sum(dim=1)
        sums = torch.stack([local_sum_dy, local_sum_dy_xhat])
        # Every process must join, even one whose batch is empty: its sums are zero.
        dist.all_reduce(sums, group=ctx.group)
        sum_dy, sum_dy_xhat = sums.unbind(0)

        shape = [1, channels] + [1] * (x_hat.dim() - 2)
        scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
        grad_x = (
            grad_out.to(x_hat.dtype)
            - (sum_dy / total).view(shape)
            - x_hat * (sum_dy_xhat / total).view(shape)
        ) * scale.view(shape)
        grad_weight = local_sum_dy_xhat.to(weight.dtype) if weight is not None else None
        grad_bias = local_sum_dy.to(weight.dtype) if ctx.has_bias else None
        return grad_x.to(grad_out.dtype), grad_weight, grad_bias, None, None, None


def sync_batch_norm(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    group: Any,
) -> Tensor:
    """Training-mode BN over the union of the batches of ``group``'s processes (module doc);
    updates the running statistics in place when they are given. Statistics are computed in
    float64 for float64 input and in float32 otherwise."""
    stats_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    out, mean, m2, total = _SyncBatchNormFunction.apply(
        input, weight, bias, eps, group, stats_dtype
    )
    update_running_stats(running_mean, running_var, mean, m2 / (total - 1), momentum)
    return out
