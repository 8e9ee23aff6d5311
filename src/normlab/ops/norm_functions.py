"""Forward and hand-derived backward passes of the small-batch norms (``normlab.norm``'s ghost_bn,
frn, evonorm_b0, evonorm_s0 and rms) as ``torch.autograd.Function``s.

Autograd through their plain formulas keeps every intermediate (about 3-5 activations each) and
runs 2-7× as long as BatchNorm on CPU (``experiments/bench/norm_cost.md``). Each function here
saves only its input and per-row statistics, as ATen's BatchNorm saves its input, mean and
inverse standard deviation, recomputes the cheap elementwise terms in the backward pass, and
works in place on the buffers it allocates. In eager mode the per-sample work runs by chunks of
samples that stay in cache (:func:`by_sample_chunks`), and BatchNorm-shaped work (Ghost BN's
virtual batches, channels-last statistics) on ATen's BatchNorm kernels; compiled, each is one
graph of plain ops that inductor fuses. EvoNorm's and FRN's float32 CPU passes go to fused C
loops instead where they can be built (``cpu_kernels``); the ATen path below stays for the rest.
``tests/norm/test_fast_paths.py`` checks each against its plain formula, whole and by chunks.

Statistics are computed in float32 for bfloat16 / float16 input (what ATen's norms do under
autocast); the output and input gradient keep the input's dtype.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from normlab.ops import cpu_kernels

# Answered in Python: the dtype checks run once per chunk, where each dispatcher call costs as
# much as a small op.
_FULL_PRECISION = (torch.float32, torch.float64)


def compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half-precision input (its statistics would round away), else x's own."""
    if x.dtype in _FULL_PRECISION:
        return x.dtype
    return torch.promote_types(x.dtype, torch.float32)


def _upcast(x: Tensor) -> Tensor:
    return x if x.dtype in _FULL_PRECISION else x.to(compute_dtype(x))


def variance_mean(
    x: Tensor, dims: tuple[int, ...] | list[int], keepdim: bool = False
) -> tuple[Tensor, Tensor]:
    """Biased variance and mean over ``dims``, as ``torch.var_mean(x, dims, correction=0)``
    returns them, in two passes (the mean, then the mean squared deviation from it): as stable,
    and on CPU 3-5× faster than ``torch.var_mean``'s Welford reduction (measured on a
    32×256×28×28 tensor: ~36 ms against ~7 ms, in either memory format). In place on a
    temporary, so not differentiable: for a forward without autograd (a Function's, or no_grad).
    Per channel of channels-last input (BatchNorm's statistics, or those of each channel of a
    few samples), in eager mode, ATen's BatchNorm statistics kernel, once per sample for the
    latter: two passes without a temporary, 5× faster (~1.7 ms)."""
    if _is_per_channel_of_channels_last(x, dims) and not torch.compiler.is_compiling():
        if 0 in dims:
            mean, var = torch.ops.aten.batch_norm_update_stats(x, None, None, 0.0)
            if keepdim:
                return _channel_view(var, x.dim()), _channel_view(mean, x.dim())
            return var, mean
        stats = [torch.ops.aten.batch_norm_update_stats(s, None, None, 0.0) for s in x.split(1)]
        mean, var = (torch.stack(column) for column in zip(*stats, strict=True))
        if keepdim:
            return var.view(*var.shape, 1, 1), mean.view(*mean.shape, 1, 1)
        return var, mean
    mean = x.mean(dims, keepdim=True)
    if x.is_contiguous():
        # x − μ, then a reduction that squares as it reads (see _mean_square): 97 µs against
        # 119 for a copy, subtract, square and mean in place on a 2×256×28×28 chunk
        values = math.prod([x.shape[d] for d in dims])
        var = torch.linalg.vector_norm(x - mean, dim=dims, keepdim=keepdim).square_()
        return var.div_(values), mean if keepdim else mean.squeeze(dims)
    var = x.clone().sub_(mean).square_().mean(dims, keepdim=keepdim)  # clone: see _product
    return var, mean if keepdim else mean.squeeze(dims)


# Per-sample statistics of channels-last input run ATen's BatchNorm statistics once per sample up
# to this many samples: a chunk of by_sample_chunks holds one or two samples of a large map,
# while a whole batch of small maps (one chunk) is left to the generic path's few ops.
_SAMPLE_LOOP = 4


def _is_per_channel_of_channels_last(x: Tensor, dims: tuple[int, ...] | list[int]) -> bool:
    reduced = sorted(dims)
    return (
        x.dim() == 4
        and (reduced == [0, 2, 3] or (reduced == [2, 3] and x.shape[0] <= _SAMPLE_LOOP))
        and x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous()
    )


def _mean_square(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """The mean of x² over ``dims`` (kept). ``linalg.vector_norm`` reads x once without a
    temporary, but on CPU it is fast only when the last reduced dim is x's innermost in memory
    (measured on 32×256×28×28: 0.7 ms, against 9-14 ms otherwise, where squaring into a new
    tensor and summing takes ~4 ms)."""
    values = math.prod([x.shape[d] for d in dims])  # a list: dynamo cannot trace a generator here
    if x.stride(dims[-1]) == 1:
        return torch.linalg.vector_norm(x, dim=dims, keepdim=True).square_().div_(values)
    return x.square().mean(dims, keepdim=True)


def _product(a: Tensor, b: Tensor) -> Tensor:
    """a·b, laid out in memory as ``a``. (For ``b`` of shape N×1×H×W, ``a * b`` lets ATen pick an
    output layout in which it runs 6× slower: 12 ms against 2 ms on 32×256×28×28. Not ``out=``:
    torch.compile cannot trace it inside an autograd.Function's forward.)"""
    return a.clone().mul_(b)


def _affine(x: Tensor, scale: Tensor, shift: Tensor, out: Tensor | None = None) -> Tensor:
    """x·scale + shift, ``scale`` and ``shift`` per channel or per sample and channel. ATen's
    fused ``addcmul`` vectorises only while at most one operand is broadcast along x's innermost
    dim: on channels-last input (channels innermost) it is the faster way, on NCHW input
    (spatial innermost) a multiply, then an add, are ~4× faster (measured on 2×256×28×28:
    addcmul 190 µs against 50, and 48 against 76 on channels_last)."""
    fused = _addcmul_vectorises(x)
    if out is None:
        return torch.addcmul(shift, x, scale) if fused else torch.mul(x, scale).add_(shift)
    if fused:
        return torch.addcmul(shift, x, scale, out=out)
    return torch.mul(x, scale, out=out).add_(shift)


def _addcmul_vectorises(x: Tensor) -> bool:
    """Whether ``addcmul`` with per-channel (or per-sample-and-channel) factors is the fast way
    on ``x`` (see :func:`_affine`): its channels are innermost in memory."""
    # Compiled, inductor fuses either way (and strides are unknown while dynamo traces a backward).
    return torch.compiler.is_compiling() or (x.dim() > 2 and x.stride(1) == 1 and x.stride(-1) != 1)


# Samples per chunk in :func:`by_sample_chunks`: about this many bytes of input. Small enough
# that a chunk and the few temporaries an elementwise chain makes of it stay in cache, large
# enough that the ~15-30 ops per chunk are not paid once per sample. Measured on 32×256×28×28
# (800 KB a sample; 3 processes, 2 threads): chunks of 2 samples ran evonorm_s0/b0 and frn
# 5-30 % faster than chunks of 1 in both memory formats; chunks of 3-8 samples were no
# faster than 2.
_CHUNK_BYTES = 1 << 21


def by_sample_chunks(
    function: Callable[..., tuple[Tensor | None, ...]],
    sliced: tuple[Tensor, ...],
    joined: int,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor | None, ...]:
    """``function(*sliced)``, in eager mode run on chunks of consecutive samples (dim 0) of the
    ``sliced`` tensors: its first ``joined`` results are per sample and joined along dim 0, the
    rest summed over the chunks (None stays None). A chain of elementwise ops on a whole
    activation reads and writes main memory, and allocates fresh pages, at every step; on a
    chunk it stays in cache and reuses the memory of the last chunk's temporaries (measured on
    a 32×256×28×28 backward: 5× less time). Under torch.compile one call on the whole tensors:
    inductor fuses the chain itself.

    With ``out_dtype``, ``function`` first takes where to write its first result (an ``out=``
    for its last op, sparing a copy): the chunk's slice of one tensor of that dtype laid out as
    ``sliced[0]``, or None when compiled (``out=`` cannot be traced there). Its other joined
    results are meant to be per-sample statistics: they are concatenated once, at the end."""
    if torch.compiler.is_compiling():
        return function(None, *sliced) if out_dtype is not None else function(*sliced)
    first = sliced[0]
    step = max(1, _CHUNK_BYTES // max(1, first[0].numel() * first.element_size()))
    # One split per tensor: a slice per tensor and chunk costs a dispatcher call each.
    chunks = zip(*(t.split(step) for t in sliced), strict=True)
    out = None if out_dtype is None else torch.empty_like(first, dtype=out_dtype)
    if out is None:
        parts = [function(*chunk) for chunk in chunks]
    else:
        parts = [function(o, *chunk) for o, chunk in zip(out.split(step), chunks, strict=True)]
    if len(parts) == 1:
        return tuple(parts[0]) if out is None else (out, *parts[0][1:])
    results: list[Tensor | None] = []
    for i, column in enumerate(zip(*parts, strict=True)):
        if i == 0 and out is not None:  # the chunks wrote their slices of it
            results.append(out)
        elif i < joined:
            results.append(torch.cat(column))
        else:
            results.append(None if column[0] is None else torch.stack(column).sum(0))
    return tuple(results)


def _channel_view(vector: Tensor, ndim: int, axis: int = 1) -> Tensor:
    """A per-channel vector shaped to broadcast along ``axis`` of an ``ndim``-dimensional tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return vector.view(shape)


# -- Ghost BN: BatchNorm of each virtual batch, all of a size at once ------------------------------


def _blocks(chunk_sizes: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(start, chunk size, chunk count) of each run of equal consecutive chunk sizes."""
    blocks, start = [], 0
    for size, run in itertools.groupby(chunk_sizes):
        count = len(list(run))
        blocks.append((start, size, count))
        start += size * count
    return blocks


def _chunk_sums(t: Tensor, blocks: list[tuple[int, int, int]]) -> Tensor:
    """Per chunk and channel: the sum of ``t`` over the chunk's samples and spatial positions
    as a (chunks, C) tensor. The full-size reduction is per sample and channel on t's own
    N×C×… shape (reducing a (chunks, size, C, …) view of channels-last memory measured 2-3×
    slower); only the N×C sums are regrouped."""
    per_sample = t.sum(tuple(range(2, t.dim()))) if t.dim() > 2 else t
    sums = []
    for start, size, count in blocks:
        sums.append(per_sample[start : start + size * count].unflatten(0, (count, size)).sum(1))
    return _concatenate(sums)


def _concatenate(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _per_sample(stat: Tensor, blocks: list[tuple[int, int, int]], ndim: int) -> Tensor:
    """A (chunks, C) statistic repeated for each sample of its chunk, shaped N×C×1×…."""
    rows, first = [], 0
    for _, size, count in blocks:
        rows.append(stat[first : first + count, None].expand(count, size, -1).flatten(0, 1))
        first += count
    per_sample = _concatenate(rows)
    return per_sample.view(*per_sample.shape, *([1] * (ndim - 2)))


def _chunk_values(x: Tensor, blocks: list[tuple[int, int, int]]) -> Tensor:
    """Values per chunk and channel, as a (chunks, 1) tensor of x's statistics' dtype."""
    sizes = torch.tensor([size for _, size, count in blocks for _ in range(count)])
    return (sizes * math.prod(x.shape[2:]))[:, None].to(compute_dtype(x))


class ChunkedBatchNorm(torch.autograd.Function):
    """``y = (x − μ_k)/sqrt(var_k + eps)·γ + β`` with ``μ_k``, ``var_k`` (biased) the statistics
    of the chunk of samples ``k`` that each sample belongs to. Also returns each chunk's mean and
    biased variance as (chunks, C) tensors (no gradient), for the running statistics.

    In eager mode on float32/float64 input each chunk runs ATen's BatchNorm kernels, writing
    into slices of one output (:func:`_aten_forward`): on channels-last input they are 2-5×
    faster than any composition of ops (measured on 32×256×28×28). Compiled, or for half
    precision input (statistics in float32), all chunks at once in composed ops."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        chunk_sizes: tuple[int, ...],
        eps: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        ctx.blocks, ctx.chunk_sizes, ctx.eps = _blocks(chunk_sizes), chunk_sizes, eps
        if _runs_aten_batch_norm(x):
            y, mean, invstd = _aten_forward(x, weight, bias, chunk_sizes, eps)
            var = invstd.square().reciprocal_().sub_(eps)
            ctx.save_for_backward(x, weight, mean, invstd)
            ctx.mark_non_differentiable(mean, var)
            return y, mean, var
        xc = _upcast(x)
        blocks, ndim = ctx.blocks, x.dim()
        values = _chunk_values(x, blocks)
        mean = _chunk_sums(xc, blocks) / values
        # Two passes, as variance_mean: the squared deviations from each chunk's mean.
        deviations = xc.clone().sub_(_per_sample(mean, blocks, ndim)).square_()
        var = _chunk_sums(deviations, blocks) / values
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight
        shift = -mean * scale if bias is None else bias - mean * scale
        y = _affine(xc, _per_sample(scale, blocks, ndim), _per_sample(shift, blocks, ndim))
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.mark_non_differentiable(mean, var)
        return y.to(x.dtype), mean, var

    @staticmethod
    def backward(ctx: Any, grad: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        if _runs_aten_batch_norm(x):
            return (*_aten_backward(ctx, grad, x, weight, mean, invstd), None, None)
        blocks, ndim = ctx.blocks, x.dim()
        xc, g = _upcast(x), _upcast(grad)
        values = _chunk_values(x, blocks)
        centred = xc.clone().sub_(_per_sample(mean, blocks, ndim))
        sum_g = _chunk_sums(g, blocks)
        sum_g_xhat = _chunk_sums(centred * g, blocks).mul_(invstd)
        gamma = invstd if weight is None else invstd * weight
        # dx = γ·invstd·(g − mean_k(g) − x̂·mean_k(g·x̂)), x̂ = (x − μ_k)·invstd
        centred.mul_(_per_sample(-gamma * invstd * sum_g_xhat / values, blocks, ndim))
        centred.sub_(_per_sample(gamma * sum_g / values, blocks, ndim))
        x_grad = centred.addcmul_(g, _per_sample(gamma, blocks, ndim))
        # Autograd casts each gradient to its input's dtype.
        needs = ctx.needs_input_grad
        return (
            x_grad if needs[0] else None,
            sum_g_xhat.sum(0) if needs[1] else None,
            sum_g.sum(0) if needs[2] else None,
            None,
            None,
        )


def _runs_aten_batch_norm(x: Tensor) -> bool:
    return not torch.compiler.is_compiling() and x.dtype == compute_dtype(x)


def _chunk_slices(chunk_sizes: tuple[int, ...]) -> list[slice]:
    ends = list(itertools.accumulate(chunk_sizes))
    return [slice(end - size, end) for end, size in zip(ends, chunk_sizes, strict=True)]


def _aten_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, chunk_sizes: tuple[int, ...], eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """BatchNorm of each chunk by ATen's kernel, written into slices of one output (``.out``
    variants: no copies); also the (chunks, C) means and inverse standard deviations."""
    y = torch.empty_like(x)
    mean = x.new_empty((len(chunk_sizes), x.shape[1]))
    invstd = torch.empty_like(mean)
    for k, chunk in enumerate(_chunk_slices(chunk_sizes)):
        torch.ops.aten.native_batch_norm.out(
            x[chunk], weight, bias, None, None, True, 0.0, eps,
            out=y[chunk], save_mean=mean[k], save_invstd=invstd[k],
        )  # fmt: skip
    return y, mean, invstd


def _aten_backward(
    ctx: Any, grad: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The input, weight and bias gradients of :func:`_aten_forward` by ATen's BatchNorm
    backward per chunk, the input's written into slices of one tensor."""
    needs = ctx.needs_input_grad
    # Always the parameters' sums: the input's gradient needs them anyway, and the .out variant
    # refuses out tensors for results it does not compute.
    mask = [needs[0], True, True]
    x_grad = torch.empty_like(x)
    # Per chunk: the weight's gradient, then the bias's.
    parts = x.new_empty((2, *mean.shape))
    for k, chunk in enumerate(_chunk_slices(ctx.chunk_sizes)):
        torch.ops.aten.native_batch_norm_backward.out(
            grad[chunk], x[chunk], weight, None, None, mean[k], invstd[k], True, ctx.eps, mask,
            out0=x_grad[chunk], out1=parts[0, k], out2=parts[1, k],
        )  # fmt: skip
    return (
        x_grad if needs[0] else None,
        parts[0].sum(0) if needs[1] else None,
        parts[1].sum(0) if needs[2] else None,
    )


# -- FRN + TLU -------------------------------------------------------------------------------------


class FilterResponseNorm(torch.autograd.Function):
    """``z = γ·x·r + β`` with ``r = (mean_spatial(x²) + eps)^−½`` per sample and channel; then
    ``max(z, τ)`` when ``tau`` is given. ``eps`` is a float or a one-element tensor (learned).
    The backward pass recomputes ``z`` for the TLU's mask instead of keeping it. Each sample is
    independent, so both passes run by chunks of samples (:func:`by_sample_chunks`)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        tau: Tensor | None,
        eps: Tensor | float,
    ) -> Tensor:
        ndim, spatial = x.dim(), tuple(range(2, x.dim()))
        gamma, beta = _channel_view(weight, ndim), _channel_view(bias, ndim)
        threshold = None if tau is None else _channel_view(tau, ndim)

        def normalise(out: Tensor | None, samples: Tensor) -> tuple[Tensor, Tensor]:
            xc = _upcast(samples)
            invrms = torch.rsqrt(_mean_square(xc, spatial) + eps)
            y = _affine(xc, invrms * gamma, beta, out=out)
            if threshold is not None:
                y = y.clamp_(min=threshold)
            return _downcast(y, samples.dtype), invrms

        fused = None
        if cpu_kernels.applies(x, weight, bias, *([] if tau is None else [tau])):
            fused = cpu_kernels.frn_forward(x, weight, bias, tau, float(eps))
        if fused is not None:
            y, invrms = fused[0], fused[1].view(*x.shape[:2], *([1] * (ndim - 2)))
        else:
            y, invrms = by_sample_chunks(normalise, (x,), joined=2, out_dtype=x.dtype)
        ctx.save_for_backward(x, weight, bias, tau, invrms)
        ctx.eps_is_tensor = isinstance(eps, Tensor)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, tau, invrms = ctx.saved_tensors
        ndim, spatial, channel_sum = x.dim(), tuple(range(2, x.dim())), (0, *range(2, x.dim()))
        gamma, beta = _channel_view(weight, ndim), _channel_view(bias, ndim)
        threshold = None if tau is None else _channel_view(tau, ndim)
        # ∂L/∂r = γ·P with P = Σ_spatial g·x per sample and channel, ∂r/∂x = −r³·x/values:
        # −r³/values for the whole batch at once
        values = math.prod(x.shape[2:])
        cubed = invrms.pow(3).div_(-values)

        def differentiate(
            out: Tensor | None, samples: Tensor, upstream: Tensor, invrms: Tensor, cubed: Tensor
        ) -> tuple[Tensor | None, ...]:
            xc, g = _upcast(samples), _upcast(upstream)
            scale = invrms * gamma
            total = None
            if threshold is not None:
                # A float mask, made in place and then turned into the masked gradient: ops on
                # bool tensors (where, masked_fill, a multiply by one) are 4-15× slower on CPU.
                passed = _affine(xc, scale, beta)
                total = g.sum(channel_sum)
                g = passed.gt_(threshold).mul_(g)
            products = g * xc
            summed = products.sum(spatial, keepdim=True)
            x_grad = torch.mul(xc, summed * gamma * cubed, out=products if out is None else out)
            x_grad = x_grad.addcmul_(g, scale)
            return x_grad, summed, g.sum(channel_sum), total

        fused = None
        if cpu_kernels.applies(x, weight, bias, *([] if tau is None else [tau])):
            fused = cpu_kernels.frn_backward(x, grad, weight, bias, tau, invrms)
        if fused is not None:
            x_grad, summed, passed_sums, grad_sums = fused
            summed, bias_grad = summed.view(invrms.shape), passed_sums.sum(0)
            total = None if tau is None else grad_sums.sum(0)
        else:
            x_grad, summed, bias_grad, total = by_sample_chunks(
                differentiate, (x, grad, invrms, cubed), joined=2, out_dtype=compute_dtype(x)
            )
        weight_grad = (summed * invrms).sum(0).flatten()
        tau_grad = None if total is None else total - bias_grad
        eps_grad = None
        if ctx.eps_is_tensor:  # ∂r/∂eps = −r³/2, summed with ∂L/∂r over samples and channels
            eps_grad = (summed * gamma * cubed).sum().mul(values / 2).view(1)
        return x_grad, weight_grad, bias_grad, tau_grad, eps_grad


# -- RMSNorm over the channels ---------------------------------------------------------------------


class ChannelRMSNorm(torch.autograd.Function):
    """``y = x·r·γ`` with ``r = (mean_C(x²) + eps)^−½`` per position (dim 1 reduced), by chunks
    of samples (:func:`by_sample_chunks`)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
        ndim, exact = x.dim(), compute_dtype(x) == x.dtype

        def normalise(out: Tensor | None, samples: Tensor) -> tuple[Tensor, Tensor]:
            xc = _upcast(samples)
            invrms = torch.rsqrt(_mean_square(xc, (1,)).add_(eps))
            # Written into the joined output where it has the compute dtype (no copy after);
            # half-precision input is scaled in float32 and rounded once.
            if exact and out is not None:
                y = torch.mul(xc, invrms, out=out)
            else:
                y = _product(xc, invrms)
            if weight is not None:
                y.mul_(_channel_view(weight, ndim))
            if out is not None and not exact:
                return out.copy_(y), invrms
            return y, invrms

        y, invrms = by_sample_chunks(normalise, (x,), joined=2, out_dtype=x.dtype)
        ctx.save_for_backward(x, weight, invrms)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, invrms = ctx.saved_tensors
        ndim, channels = x.dim(), x.shape[1]

        def differentiate(
            out: Tensor | None, samples: Tensor, upstream: Tensor, invrms: Tensor
        ) -> tuple[Tensor | None, ...]:
            xc, g = _upcast(samples), _upcast(upstream)
            scaled = (g * xc).mul_(invrms)  # g·x̂, x̂ = x·r
            weight_grad = None
            if weight is not None:
                gamma = _channel_view(weight, ndim)
                weight_grad = scaled.sum((0, *range(2, ndim)))
                scaled.mul_(gamma)
            # dx = r·(g' − x̂·mean_C(g'·x̂)) = g'·r − x·r²·mean_C(g'·x̂), g' = γ·g
            projection = scaled.sum(1, keepdim=True).div_(-channels).mul_(invrms.square())
            x_grad = scaled if out is None else out
            if weight is not None:
                x_grad = torch.mul(g, gamma, out=x_grad).mul_(invrms)
            else:
                x_grad = torch.mul(g, invrms, out=x_grad)
            return x_grad.addcmul_(xc, projection), weight_grad

        x_grad, weight_grad = by_sample_chunks(
            differentiate, (x, grad, invrms), joined=1, out_dtype=compute_dtype(x)
        )
        return x_grad, weight_grad, None


# -- EvoNorm ---------------------------------------------------------------------------------------


class EvoNormB0Function(torch.autograd.Function):
    """``y = x / max(σ_B, v·x + σ_I)·γ + β``, ``σ_I = sqrt(var_spatial(x) + eps)`` per sample and
    channel, ``σ_B = sqrt(var_B + eps)`` per channel: ``var_B`` the batch's biased variance
    (differentiable), or ``running_var`` (a constant) when given. Also returns the batch's
    ``var_B`` (no gradient; None with ``running_var``) for the running average. Both passes
    run by chunks of samples (:func:`by_sample_chunks`); the terms through the batch's
    statistics, which need every chunk's, are added after."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        v: Tensor,
        running_var: Tensor | None,
        eps: float,
    ) -> tuple[Tensor, Tensor | None]:
        ndim, spatial = x.dim(), tuple(range(2, x.dim()))
        fused = cpu_kernels.applies(x, weight, bias, v)
        statistics = cpu_kernels.instance_statistics(x) if fused else None
        if statistics is not None:
            kept = (*x.shape[:2], *([1] * (ndim - 2)))  # keepdim's shape
            instance_var, instance_mean = (statistic.view(kept) for statistic in statistics)
        else:

            def instance_statistics(samples: Tensor) -> tuple[Tensor, Tensor]:
                return variance_mean(_upcast(samples), spatial, keepdim=True)

            instance_var, instance_mean = by_sample_chunks(instance_statistics, (x,), joined=2)
        batch_mean = batch_var = None
        if running_var is None:
            # The batch's statistics from the instances' (law of total variance): no more passes.
            batch_mean = instance_mean.mean(0, keepdim=True)
            spread = (instance_mean - batch_mean).square_()
            batch_var = (instance_var.mean(0) + spread.mean(0)).flatten()
            batch_std = _channel_view(torch.sqrt(batch_var + eps), ndim)
            ctx.mark_non_differentiable(batch_var)
        else:
            batch_std = _channel_view(torch.sqrt(running_var + eps), ndim)
        instance_std = instance_var.add_(eps).sqrt_()
        gamma, beta, v_view = (_channel_view(t, ndim) for t in (weight, bias, v))

        def normalise(out: Tensor | None, samples: Tensor, instance_std: Tensor) -> tuple[Tensor]:
            xc = _upcast(samples)
            denominator = _evonorm_b0_denominator(xc, v_view, instance_std, batch_std)
            # x·γ/D + β in one op: D/γ is computed after the max, so a negative γ is no problem.
            y = torch.addcdiv(beta, xc, denominator.div_(gamma), out=out)
            return (_downcast(y, samples.dtype),)

        y = None
        if statistics is not None:
            y = cpu_kernels.b0_forward(x, weight, bias, v, instance_std, batch_std)
        if y is None:
            (y,) = by_sample_chunks(normalise, (x, instance_std), joined=1, out_dtype=x.dtype)
        ctx.save_for_backward(x, weight, v, instance_mean, instance_std, batch_std, batch_mean)
        return y, batch_var

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _: Tensor | None) -> tuple[Tensor | None, ...]:
        x, weight, v, instance_mean, instance_std, batch_std, batch_mean = ctx.saved_tensors
        if cpu_kernels.applies(x, weight, v):
            stats = (instance_mean, instance_std, batch_std, batch_mean)
            fused = cpu_kernels.b0_backward(x, grad, weight, v, *stats)
            if fused is not None:
                return *fused, None, None
        ndim = x.dim()
        spatial, channel_sum = tuple(range(2, ndim)), (0, *range(2, ndim))
        gamma, v_view = _channel_view(weight, ndim), _channel_view(v, ndim)
        negative_gamma_v = gamma * v_view.neg()
        # ∂σ_I/∂x = (x − μ_I)/(n_I·σ_I), with the −γ of e (below) per sample and channel, for
        # the whole batch at once
        instance_slope = gamma.neg() / (instance_std * math.prod(x.shape[2:]))
        with_batch = batch_mean is not None

        def differentiate(
            out: Tensor | None,
            samples: Tensor,
            upstream: Tensor,
            instance_mean: Tensor,
            instance_std: Tensor,
            instance_slope: Tensor,
        ) -> tuple[Tensor | None, ...]:
            """dx without the term through σ_B (and, when there is one, without its constant
            per sample and channel, left to the pass that adds it), and the sums it needs."""
            xc, g = _upcast(samples), _upcast(upstream)
            denominator = _evonorm_b0_denominator(xc, v_view, instance_std, batch_std)
            direct = torch.div(g, denominator, out=out)  # ∂L/∂(x/D)·1/γ
            products = direct * xc
            weight_grad = products.sum(channel_sum)
            # e = ∂L/∂D = −γ·g·x/D² = −γ·q: q in full, −γ (per channel) on q's sums and factors
            q = products.div_(denominator)
            total = q.sum(channel_sum) if with_batch else None
            instance_side = denominator.gt_(batch_std)  # 1 where v·x + σ_I won the max
            q_instance = q.mul_(instance_side)
            instance_sum = q_instance.sum(spatial, keepdim=True)
            v_sum = torch.mul(q_instance, xc, out=instance_side).sum(channel_sum)
            coefficient = instance_sum * instance_slope
            x_grad = direct.mul_(gamma).addcmul_(q_instance, negative_gamma_v)
            x_grad = x_grad.addcmul_(xc, coefficient)
            instance_offset = coefficient.mul_(instance_mean)
            sums = (weight_grad, g.sum(channel_sum), v_sum)
            if not with_batch:
                return x_grad.sub_(instance_offset), *sums, None, None
            return x_grad, instance_offset, *sums, total, instance_sum.sum(0)

        x_grad, *rest = by_sample_chunks(
            differentiate,
            (x, grad, instance_mean, instance_std, instance_slope),
            joined=1 + with_batch,
            out_dtype=compute_dtype(x),
        )
        instance_offset = rest.pop(0) if with_batch else None
        weight_grad, bias_grad, v_sum, total, instance_sum = rest
        if with_batch:
            # ∂L/∂σ_B: the sum of e over the batch side, Σ(−γ·q) − Σ_I(−γ·q_instance)
            batch_side = (instance_sum.flatten() - total) * weight
            # ∂σ_B/∂x = (x − μ_B)/(n_B·σ_B), weighted by ∂L/∂σ_B
            slope = _channel_view(batch_side, ndim) / (batch_std * (x.numel() // x.shape[1]))
            offset = slope * batch_mean

            def add_batch_term(partial: Tensor, samples: Tensor, constant: Tensor) -> tuple[()]:
                partial.addcmul_(_upcast(samples), slope).sub_(constant + offset)
                return ()

            by_sample_chunks(add_batch_term, (x_grad, x, instance_offset), joined=0)
        return x_grad, weight_grad, bias_grad, v_sum * weight.neg(), None, None


def _evonorm_b0_denominator(x: Tensor, v: Tensor, instance_std: Tensor, batch_std: Tensor):
    """max(v·x + σ_I, σ_B), ``v`` a channel view."""
    return _affine(x, v, instance_std).clamp_(min=batch_std)


class EvoNormS0Function(torch.autograd.Function):
    """``y = x·sigmoid(v·x)·r·γ + β``, ``r = (var_group(x) + eps)^−½`` per sample and group of
    channels (``groups`` consecutive channels; over the group's channels and spatial axes). The
    backward pass recomputes the sigmoid. Every full-size op runs on x's own N×C×… shape with
    per-sample-and-channel factors; the statistics are kept per sample and group, N×G×1
    (elementwise ops on an N×G×(C/G)×H×W view of channels-last memory measured 2-3× slower).
    Each sample is independent, so both passes run by chunks of samples
    (:func:`by_sample_chunks`); what only needs the per-sample sums is done once, after them."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, v: Tensor, groups: int, eps: float
    ) -> Tensor:
        if cpu_kernels.applies(x, weight, bias, v):
            fused = cpu_kernels.s0_forward(x, weight, bias, v, groups, eps)
            if fused is not None:
                y, mean, invstd = fused
                ctx.save_for_backward(x, weight, v, mean.unsqueeze(-1), invstd.unsqueeze(-1))
                return y
        ndim, spatial = x.dim(), tuple(range(2, x.dim()))
        gamma = weight.view(groups, -1)
        beta, v_view = _channel_view(bias, ndim), _channel_view(v, ndim)

        def normalise(out: Tensor | None, samples: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            xc = _upcast(samples)
            # Each group's from its channels' (law of total variance), as EvoNorm-B0's batch's.
            channel_var, channel_mean = variance_mean(xc, spatial)
            channel_mean = channel_mean.view(len(xc), groups, -1)
            mean = channel_mean.mean(2, keepdim=True)
            spread = (channel_mean - mean).square_().add_(channel_var.view_as(channel_mean))
            invstd = spread.mean(2, keepdim=True).add_(eps).rsqrt_()
            scale = (invstd * gamma).view(*xc.shape[:2], *([1] * (ndim - 2)))
            gate = torch.mul(xc, v_view).sigmoid_()
            if _addcmul_vectorises(xc):
                y = _affine(gate.mul_(xc), scale, beta, out=out)
            else:  # one op fewer than _affine's multiply and add (290 µs against 313 a chunk)
                y = torch.addcmul(beta, gate, torch.mul(xc, scale), out=out)
            return _downcast(y, samples.dtype), mean, invstd

        y, mean, invstd = by_sample_chunks(normalise, (x,), joined=3, out_dtype=x.dtype)
        ctx.save_for_backward(x, weight, v, mean, invstd)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, v, mean, invstd = ctx.saved_tensors
        if cpu_kernels.applies(x, weight, v):
            fused = cpu_kernels.s0_backward(x, grad, weight, v, mean, invstd)
            if fused is not None:
                return *fused, None, None
        ndim, spatial = x.dim(), tuple(range(2, x.dim()))
        groups, per_channel = mean.shape[1], (*x.shape[:2], *([1] * (ndim - 2)))
        gamma, v_view = weight.view(groups, -1), _channel_view(v, ndim)
        # For the whole batch at once: r·γ per sample and channel; −r³/n (∂r/∂var, n values a
        # group) and −μ per sample and group.
        scale = (invstd * gamma).view(per_channel)
        cubed = invstd.pow(3).div_(-(x[0].numel() // groups))

        def differentiate(
            out: Tensor | None,
            samples: Tensor,
            upstream: Tensor,
            scale: Tensor,
            cubed: Tensor,
            negative_mean: Tensor,
        ) -> tuple[Tensor, ...]:
            xc, g = _upcast(samples), _upcast(upstream)
            gate = torch.mul(xc, v_view).sigmoid_()
            gated_grad = g * gate  # g·s, a term of dx
            # u = g·x·s·(1 − s), after P = Σ_spatial g·h with h = x·s
            u = gated_grad * xc
            products = u.sum(spatial)
            u.addcmul_(u, gate, value=-1)
            x_grad = u * xc
            v_products = x_grad.sum(spatial)
            # ∂L/∂r per sample and group (Σ over the group's channels of γ·P), times −r³/n: the
            # coefficient c of dx = γ·r·(g·s + v·u) + c·(x − μ), as a channel factor.
            r_grad = (products.view(len(xc), groups, -1) * gamma).sum(2, keepdim=True)
            coefficient = r_grad.mul_(cubed).expand(-1, -1, gamma.shape[1])
            offset = (coefficient * negative_mean).reshape(scale.shape)
            x_grad = _affine(gated_grad, scale, offset, out=x_grad if out is None else out)
            x_grad = x_grad.addcmul_(u, scale * v_view)
            x_grad = x_grad.addcmul_(xc, coefficient.reshape(scale.shape))
            return x_grad, products, v_products, g.sum((0, *spatial))

        x_grad, products, v_products, bias_grad = by_sample_chunks(
            differentiate,
            (x, grad, scale, cubed, mean.neg()),
            joined=3,
            out_dtype=compute_dtype(x),
        )
        # Σ over the batch of P·r and of Σ_spatial(u·x)·r·γ
        weight_grad = (products.view(*invstd.shape[:2], -1) * invstd).sum(0).flatten()
        v_grad = (v_products * scale.view(v_products.shape)).sum(0)
        return x_grad, weight_grad, bias_grad, v_grad, None, None


def _downcast(y: Tensor, dtype: torch.dtype) -> Tensor:
    return y if y.dtype == dtype else y.to(dtype)
