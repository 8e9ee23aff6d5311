"""cuda_bn's kernels as PyTorch operators: autograd, ``torch.compile`` and cross-process sync.

The single-process path is three ``torch.library`` custom ops (training forward, eval forward,
backward) with fake implementations and an autograd formula, so ``torch.compile`` treats each as
one opaque node (running-statistics updates included) instead of tracing into Triton's launcher.
The synchronised path needs collectives between the kernels and is an ``autograd.Function``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from normlab.norm.sync import update_running_stats
from normlab.ops.batchnorm import kernels
from normlab.ops.batchnorm.kernels import layout_of, same_layout, stats_dtype


def _channel_count(x: Tensor) -> int:
    return x.numel() // max(x.shape[1], 1)


def _empty() -> Tensor:
    return torch.empty(0)


# Functional (no in-place update of the running statistics): custom ops that mutate their inputs
# cannot have an autograd formula, so the caller applies ``update_running_stats`` to the outputs.
@torch.library.custom_op("normlab::batch_norm_train", mutates_args=())
def _train_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str | None,
    negative_slope: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, batch mean, batch 1/σ, batch unbiased variance)."""
    x, layout = layout_of(x)
    mean, invstd, unbiased, _ = kernels.merge_stats(kernels.local_stats(x, layout), eps)
    y = kernels.normalize(
        x, layout, mean, invstd, weight, bias, eps, False, activation, negative_slope
    )
    return y, mean, invstd, unbiased


@_train_forward.register_fake
def _(x, weight, bias, eps, activation, negative_slope):
    def per_channel() -> Tensor:
        return x.new_empty(x.shape[1], dtype=stats_dtype(x))

    return torch.empty_like(x), per_channel(), per_channel(), per_channel()


@torch.library.custom_op("normlab::batch_norm_eval", mutates_args=())
def _eval_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    activation: str | None,
    negative_slope: float,
) -> Tensor:
    x, layout = layout_of(x)
    return kernels.normalize(
        x, layout, running_mean, running_var, weight, bias, eps, True, activation, negative_slope
    )


@_eval_forward.register_fake
def _(x, weight, bias, running_mean, running_var, eps, activation, negative_slope):
    return torch.empty_like(x)


@torch.library.custom_op("normlab::batch_norm_backward", mutates_args=())
def _backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    spread: Tensor,
    eps: float,
    batch_stats: bool,
    activation: str | None,
    negative_slope: float,
    input_grad: bool,
    param_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dγ, dβ); a gradient that was not asked for (or has no parameter) is an empty tensor.

    ``spread`` is 1/σ of the batch (``batch_stats``) or the running variance (eval mode).
    """
    x, layout = layout_of(x)
    grad_out = same_layout(grad_out, x)
    args = (mean, spread, weight, bias, eps, not batch_stats, activation, negative_slope)
    sums = None
    if param_grad or (input_grad and batch_stats):
        sums = kernels.grad_sums(grad_out, x, layout, *args)
    grad_x = _empty()
    if input_grad:
        means = (sums / max(_channel_count(x), 1)).unbind(0) if batch_stats else (None, None)
        grad_x = kernels.grad_input(grad_out, x, layout, *args, *means)
    grad_weight, grad_bias = _empty(), _empty()
    if param_grad and weight is not None:
        grad_weight = sums[1].to(weight.dtype, copy=True)  # outputs may not alias each other
    if param_grad and bias is not None:
        grad_bias = sums[0].to(bias.dtype, copy=True)
    return grad_x, grad_weight, grad_bias


@_backward.register_fake
def _(grad_out, x, weight, bias, mean, spread, eps, batch_stats, activation, negative_slope,
      input_grad, param_grad):  # fmt: skip
    grad_x = torch.empty_like(x) if input_grad else x.new_empty(0)
    grad_weight = torch.empty_like(weight) if param_grad and weight is not None else x.new_empty(0)
    grad_bias = torch.empty_like(bias) if param_grad and bias is not None else x.new_empty(0)
    return grad_x, grad_weight, grad_bias


def _none_if_empty(grad: Tensor, wanted: bool) -> Tensor | None:
    return grad if wanted else None


def _call_backward(ctx: Any, grad_out: Tensor, batch_stats: bool) -> tuple[Tensor | None, ...]:
    x, weight, bias, mean, spread = ctx.saved_tensors
    input_grad = ctx.needs_input_grad[0]
    param_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    grad_x, grad_weight, grad_bias = torch.ops.normlab.batch_norm_backward(
        grad_out, x, weight, bias, mean, spread, ctx.eps, batch_stats, ctx.activation,
        ctx.negative_slope, input_grad, param_grad,
    )  # fmt: skip
    return (
        _none_if_empty(grad_x, input_grad),
        _none_if_empty(grad_weight, ctx.needs_input_grad[1]),
        _none_if_empty(grad_bias, ctx.needs_input_grad[2]),
    )


def _train_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, bias, eps, activation, negative_slope = inputs
    _, mean, invstd, _ = output
    ctx.save_for_backward(x, weight, bias, mean, invstd)
    ctx.eps, ctx.activation, ctx.negative_slope = eps, activation, negative_slope


def _train_backward(ctx: Any, grad_out: Tensor, *_statistics_grads: Tensor):
    return *_call_backward(ctx, grad_out, batch_stats=True), None, None, None


def _eval_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, weight, bias, running_mean, running_var, eps, activation, negative_slope = inputs
    ctx.save_for_backward(x, weight, bias, running_mean, running_var)
    ctx.eps, ctx.activation, ctx.negative_slope = eps, activation, negative_slope


def _eval_backward(ctx: Any, grad_out: Tensor):
    return *_call_backward(ctx, grad_out, batch_stats=False), None, None, None, None, None


_train_forward.register_autograd(_train_backward, setup_context=_train_setup)
_eval_forward.register_autograd(_eval_backward, setup_context=_eval_setup)


def batch_norm(
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
    """act(BN(x)) with the Triton kernels, as ``F.batch_norm`` plus a fused activation."""
    if use_batch_stats:
        y, mean, _, unbiased_var = torch.ops.normlab.batch_norm_train(
            x, weight, bias, eps, activation, negative_slope
        )
        if _channel_count(x) > 0:  # an empty batch leaves the running statistics alone
            update_running_stats(running_mean, running_var, mean, unbiased_var, momentum)
        return y
    return torch.ops.normlab.batch_norm_eval(
        x, weight, bias, running_mean, running_var, eps, activation, negative_slope
    )


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch statistics over every process of ``group`` (see :func:`sync_batch_norm`)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
        activation: str | None,
        negative_slope: float,
        group: Any,
    ) -> Tensor:
        x, layout = layout_of(x)
        *_, local = kernels.merge_stats(kernels.local_stats(x, layout), eps, write_stats=True)
        shares = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(shares, local, group=group)
        gathered = torch.stack(shares, dim=1)  # [3 (count, mean, M2), processes, C]
        if _channel_count(x) < 2 and float(gathered[0, :, 0].sum()) < 2:
            # Every process sees the same total, so all of them raise: nobody is left waiting.
            raise ValueError(
                "Expected more than 1 value per channel when training, got "
                f"{int(gathered[0, :, 0].sum())} across the synchronised processes"
            )
        mean, invstd, unbiased_var, merged = kernels.merge_stats(gathered, eps, write_stats=True)
        update_running_stats(running_mean, running_var, mean, unbiased_var, momentum)
        y = kernels.normalize(
            x, layout, mean, invstd, weight, bias, eps, False, activation, negative_slope
        )
        ctx.save_for_backward(x, weight, bias, mean, invstd, merged[0])
        ctx.config = (eps, activation, negative_slope, group)
        return y

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, mean, invstd, total = ctx.saved_tensors
        eps, activation, negative_slope, group = ctx.config
        x, layout = layout_of(x)
        grad_out = same_layout(grad_out, x)
        args = (mean, invstd, weight, bias, eps, False, activation, negative_slope)
        local = kernels.grad_sums(grad_out, x, layout, *args)
        # Every process joins, even one whose batch is empty (its sums are zero).
        global_sums = local.clone()
        dist.all_reduce(global_sums, group=group)
        mean_dz, mean_dz_xhat = (global_sums / total).unbind(0)
        grad_x = kernels.grad_input(grad_out, x, layout, *args, mean_dz, mean_dz_xhat)
        grad_weight = local[1].to(weight.dtype) if weight is not None else None
        grad_bias = local[0].to(bias.dtype) if bias is not None else None
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None


def sync_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    activation: str | None,
    negative_slope: float,
    group: Any,
) -> Tensor:
    """Training-mode act(BN(x)) over the union of the batches of ``group``'s processes.

    Forward: per-process (count, mean, M2) → one all-gather → Chan merge (uneven and empty batches
    weigh correctly). Backward: one all-reduce of Σdz and Σdz·x̂; γ/β gradients stay local
    (DDP averages them like every other parameter).
    """
    return _SyncBatchNormFunction.apply(
        x, weight, bias, running_mean, running_var, momentum, eps, activation, negative_slope, group
    )
