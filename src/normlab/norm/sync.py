"""Synchronised BatchNorm that works on every backend (gloo on CPU, NCCL on CUDA).

torch's ``nn.SyncBatchNorm`` refuses CPU tensors whenever a process group exists, so a laptop
cannot run multi-process code that uses it. :class:`SyncBatchNorm` has BatchNorm's parameters and
buffers (state dicts move between ``bn`` and ``syncbn`` both ways) and, in training with more than
one process in its group:

- forward: each process computes its per-channel count, mean and sum of squared deviations (M2);
  one all-gather shares them and every process merges them exactly (Chan et al.'s parallel
  variance), so uneven and empty per-process batches weigh correctly. Running statistics use the
  unbiased variance of the merged batch, with ``momentum=None`` as a cumulative average.
- backward: one all-reduce of the per-channel Σdy and Σdy·x̂ gives every process the input gradient
  of the big batch. Weight and bias gradients stay local (Σ over the process's own samples); DDP's
  gradient averaging then scales them like every other parameter.

Every process joins both collectives in every training step, including a process whose batch is
empty. In eval mode, without a process group, or with a group of one, it is exactly BatchNorm.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

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
        groups = [
            dist.new_group(list(range(start, start + group_size)))
            for start in range(0, world, group_size)
        ]
        _GROUPS[key] = groups[dist.get_rank() // group_size]
    return _GROUPS[key]


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
        if bool((total < 2).any()):
            # Every process sees the same total, so all of them raise: nobody is left waiting.
            raise ValueError(
                "Expected more than 1 value per channel when training, got "
                f"{int(total.min())} across the synchronised processes"
            )
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
    updates the running statistics in place when they are given."""
    stats_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    out, mean, m2, total = _SyncBatchNormFunction.apply(
        input, weight, bias, eps, group, stats_dtype
    )
    update_running_stats(running_mean, running_var, mean, m2 / (total - 1), momentum)
    return out


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the union of the batches of all processes in a group (see module doc).

    Any input N×C×* with at least two dimensions. ``group_size``: synchronise within blocks of
    that many consecutive ranks (``None``: all ranks). ``process_group``: an explicit group,
    overriding ``group_size``. Statistics are computed in float64 for float64 inputs and in
    float32 otherwise.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        group_size: int | None = None,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        if group_size is not None and group_size < 1:
            raise ArgumentError(
                "group_size", group_size, f"{{key}} must be a positive integer, got {group_size}"
            )
        self.group_size = group_size
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _group(self) -> Any:
        return self.process_group or process_group_for(self.group_size)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        group = self._group() if self.training else None
        if group is None or dist.get_world_size(group) == 1:
            return super().forward(input)

        return sync_batch_norm(
            input, self.weight, self.bias, self.running_mean, self.running_var,
            step_momentum(self), self.eps, group,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"

    @classmethod
    def from_batchnorm(
        cls, bn: nn.modules.batchnorm._BatchNorm, group_size: int | None = None
    ) -> SyncBatchNorm:
        """A synchronised copy of ``bn`` with the same parameters, buffers and train/eval mode."""
        sync = cls(
            bn.num_features,
            bn.eps,
            bn.momentum,
            bn.affine,
            bn.track_running_stats,
            group_size=group_size,
        )
        sync.load_state_dict(bn.state_dict())
        sync.to(device=_device_of(bn))
        sync.train(bn.training)
        for name, parameter in bn.named_parameters(recurse=False):
            getattr(sync, name).requires_grad_(parameter.requires_grad)
        return sync


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")
