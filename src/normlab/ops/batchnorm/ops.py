"""cuda_bn's kernels as PyTorch operators: autograd, ``torch.compile`` and cross-process sync.

The single-process path is four ``torch.library`` custom ops with fake implementations: batch
statistics (updating the running ones in place), training forward and eval forward (each with an
autograd formula) and their backward, so ``torch.compile`` treats each as one opaque node instead
of tracing into Triton's launcher.
The synchronised path needs collectives between the kernels and is an ``autograd.Function``.

Autocast: the ops register no autocast rule (``torch.library.register_autocast``), so autocast
passes them the tensors as they are, as it passes ATen's ``batch_norm``, which is on none of its
cast lists: a bf16 convolution's output goes in as bf16, the kernels compute the statistics in
float32 and update the float32 running buffers, and the output has the input's dtype. A rule
would cast every floating-point input to one dtype, and neither fits: to bfloat16, it would hand
``batch_norm_stats`` bf16 copies of the running buffers, so their in-place update would be lost
without a word; to float32, it would double the size of the input saved for backward and of the
output, which native BN under autocast keeps in bf16. ``tests/ops/test_cuda_bn.py`` checks that
no rule is registered and what the ops do under CPU autocast.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from normlab.ops.batchnorm import kernels
from normlab.ops.batchnorm.kernels import layout_of, same_layout, stats_dtype
from normlab.ops.bn_stats import require_two_values


def _channel_count(x: Tensor) -> int:
    return x.numel() // max(x.shape[1], 1)


def _empty() -> Tensor:
    return torch.empty(0)


# The running statistics are updated inside the merge kernel, so the statistics are an op of
# their own: an op that mutates its inputs cannot have an autograd formula, and it needs none
# (the input gradient of ``batch_norm_train`` already accounts for the batch statistics).
@torch.library.custom_op("normlab::batch_norm_stats", mutates_args=("running_mean", "running_var"))
def _batch_stats(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
) -> Tensor:
    """``[3, C]``: (count, mean, 1/σ) of the batch; running buffers (if given) moved towards its
    mean and unbiased variance, unless the batch is empty."""
    x, layout = layout_of(x)
    partial = kernels.local_stats(x, layout)
    return kernels.merge_stats(partial, eps, running_mean, running_var, momentum)


@_batch_stats.register_fake
def _(x, running_mean, running_var, momentum, eps):
    return x.new_empty((3, x.shape[1]), dtype=stats_dtype(x))


@torch.library.custom_op("normlab::batch_norm_train", mutates_args=())
def _train_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    stats: Tensor,
    eps: float,
    activation: str | None,
    negative_slope: float,
) -> Tensor:
    """act(BN(x)) with the batch's ``stats`` from ``batch_norm_stats``."""
    x, layout = layout_of(x)
    return kernels.normalize(
        x, layout, stats[1], stats[2], weight, bias, eps, False, activation, negative_slope
    )


@_train_forward.register_fake
def _(x, weight, bias, stats, eps, activation, negative_slope):
    return torch.empty_like(x)


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
    count: Tensor | None,
    eps: float,
    activation: str | None,
    negative_slope: float,
    input_grad: bool,
    param_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dγ, dβ); a gradient that was not asked for (or has no parameter) is an empty tensor.

    With batch statistics ``spread`` is the batch's 1/σ and ``count`` its per-channel count;
    without (eval mode, ``count`` None) ``spread`` is the running variance.
    """
    x, layout = layout_of(x)
    grad_out = same_layout(grad_out, x)
    batch_stats = count is not None
    args = (mean, spread, weight, bias, eps, not batch_stats, activation, negative_slope)
    means = grad_weight = grad_bias = None
    if param_grad or (input_grad and batch_stats):
        means, grad_weight, grad_bias = kernels.finish_grad_sums(
            kernels.grad_sums(grad_out, x, layout, *args),
            count if input_grad else None,
            weight if param_grad else None,
            bias if param_grad else None,
        )
    grad_x = kernels.grad_input(grad_out, x, layout, *args, means) if input_grad else _empty()
    return (
        grad_x,
        _empty() if grad_weight is None else grad_weight,
        _empty() if grad_bias is None else grad_bias,
    )


@_backward.register_fake
def _(grad_out, x, weight, bias, mean, spread, count, eps, activation, negative_slope,
      input_grad, param_grad):  # fmt: skip
    grad_x = torch.empty_like(x) if input_grad else x.new_empty(0)
    grad_weight = torch.empty_like(weight) if param_grad and weight is not None else x.new_empty(0)
    grad_bias = torch.empty_like(bias) if param_grad and bias is not None else x.new_empty(0)
    return grad_x, grad_weight, grad_bias


def _none_if_empty(grad: Tensor, wanted: bool) -> Tensor | None:
    return grad if wanted else None


def _call_backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
    x, weight, bias, mean, spread, count = ctx.saved_tensors
    input_grad = ctx.needs_input_grad[0]
    param_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    grad_x, grad_weight, grad_bias = torch.ops.normlab.batch_norm_backward(
        grad_out, x, weight, bias, mean, spread, count, ctx.eps, ctx.activation,
        ctx.negative_slope, input_grad, param_grad,
    )  # fmt: skip
    return (
        _none_if_empty(grad_x, input_grad),
        _none_if_empty(grad_weight, ctx.needs_input_grad[1]),
        _none_if_empty(grad_bias, ctx.needs_input_grad[2]),
    )


def _train_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, weight, bias, stats, eps, activation, negative_slope = inputs
    count, mean, invstd = stats.unbind(0)
    ctx.save_for_backward(x, weight, bias, mean, invstd, count)
    ctx.eps, ctx.activation, ctx.negative_slope = eps, activation, negative_slope


def _train_backward(ctx: Any, grad_out: Tensor):
    return *_call_backward(ctx, grad_out), None, None, None, None


def _eval_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, weight, bias, running_mean, running_var, eps, activation, negative_slope = inputs
    ctx.save_for_backward(x, weight, bias, running_mean, running_var, None)
    ctx.eps, ctx.activation, ctx.negative_slope = eps, activation, negative_slope


def _eval_backward(ctx: Any, grad_out: Tensor):
    return *_call_backward(ctx, grad_out), None, None, None, None, None


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
    """act(BN(x)) with the Triton kernels, as ``F.batch_norm`` plus a fused activation.

    Training is three kernel launches forward (partial statistics, merge with the running
    statistics' update, normalise) and at most three backward (partial sums, their merge into
    the means and dγ/dβ, input gradient)."""
    if use_batch_stats:
        stats = torch.ops.normlab.batch_norm_stats(
            x.detach(), running_mean, running_var, momentum, eps
        )
        return torch.ops.normlab.batch_norm_train(
            x, weight, bias, stats, eps, activation, negative_slope
        )
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
        local = kernels.merge_stats(kernels.local_stats(x, layout), eps, share=True)
        shares = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(shares, local, group=group)
        gathered = torch.stack(shares, dim=1)  # [3 (count, mean, M2), processes, C]
        if _channel_count(x) < 2:  # else the total is ≥ 2 without reading it off the device
            require_two_values(int(gathered[0, :, 0].sum()))
        stats = kernels.merge_stats(gathered, eps, running_mean, running_var, momentum)
        count, mean, invstd = stats.unbind(0)
        y = kernels.normalize(
            x, layout, mean, invstd, weight, bias, eps, False, activation, negative_slope
        )
        ctx.save_for_backward(x, weight, bias, mean, invstd, count)
        ctx.config = (eps, activation, negative_slope, group)
        return y

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, mean, invstd, count = ctx.saved_tensors
        eps, activation, negative_slope, group = ctx.config
        x, layout = layout_of(x)
        grad_out = same_layout(grad_out, x)
        args = (mean, invstd, weight, bias, eps, False, activation, negative_slope)
        # This process's sums over the count of all processes: summed over them, the means.
        # γ/β gradients stay local (Σ over this process's samples).
        shares, grad_weight, grad_bias = kernels.finish_grad_sums(
            kernels.grad_sums(grad_out, x, layout, *args), count, weight, bias
        )
        # Every process joins, even one whose batch is empty (its sums are zero).
        dist.all_reduce(shares, group=group)
        grad_x = kernels.grad_input(grad_out, x, layout, *args, shares)
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
