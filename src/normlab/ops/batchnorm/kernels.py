"""Triton kernels of cuda_bn and the host code that launches them.

Every kernel sees its input as a 3-D array ``[outer, channel, inner]`` with arbitrary strides:

- contiguous N×C×* input: ``outer = N``, ``inner = H·W·…`` (inner stride 1);
- channels-last input (and plain N×C): ``outer = N·H·W·…``, ``inner = 1`` (channel stride 1).

A program handles a 3-D tile ``[BLOCK_O, BLOCK_C, BLOCK_I]``; the plan picks the tile so that its
contiguous axis is the memory-contiguous one, which is what makes the loads coalesce in either
layout. The reduction over ``outer × inner`` (N·H·W) is cut into *chunks* of one tile, and the
chunks of a channel block are split over several programs, each producing a partial
(count, mean, M2) that a second, tiny kernel merges with Chan et al.'s parallel formula. So a layer
with few channels and a large spatial size still fills the GPU, and no statistic is ever formed
as a difference of large sums (Welford within a program, Chan across programs, in fp32 — fp64
for fp64 input).

Passes over the data (the minimum for training-mode BN): forward reads x twice (statistics, then
normalise + affine + activation, writing y); backward reads x and dy twice (the per-channel sums
Σdz and Σdz·x̂, then the input gradient). The activation is recomputed from x in backward, so
nothing but x is kept for it.

Under ``TRITON_INTERPRET=1`` (set before this module is imported) the same kernels run on CPU
tensors; that is how CI tests them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

# Activation codes passed to the kernels (a constexpr, so each variant compiles on its own).
ACTIVATIONS: dict[str | None, int] = {None: 0, "relu": 1, "leaky_relu": 2, "silu": 3}


# --------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def _activate(z, ACT: tl.constexpr, slope):
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = tl.where(z > 0, z, z * slope)
    elif ACT == 3:
        z = z / (1.0 + tl.exp(-z))
    return z


@triton.jit
def _activation_grad(dy, z, ACT: tl.constexpr, slope):
    """dy · act'(z); at z = 0 the ReLUs take the left derivative, as torch does."""
    if ACT == 1:
        dy = tl.where(z > 0, dy, 0.0)
    elif ACT == 2:
        dy = tl.where(z > 0, dy, dy * slope)
    elif ACT == 3:
        sig = 1.0 / (1.0 + tl.exp(-z))
        dy = dy * sig * (1.0 + z * (1.0 - sig))
    return dy


@triton.jit
def _tile(
    chunk,
    c_start,
    outer,
    channels,
    inner,
    stride_o,
    stride_c,
    stride_i,
    num_i_blocks,
    BLOCK_O: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """Element offsets and mask of one [BLOCK_O, BLOCK_C, BLOCK_I] tile."""
    o = (chunk // num_i_blocks) * BLOCK_O + tl.arange(0, BLOCK_O)[:, None, None]
    c = c_start + tl.arange(0, BLOCK_C)[None, :, None]
    i = (chunk % num_i_blocks) * BLOCK_I + tl.arange(0, BLOCK_I)[None, None, :]
    mask = (o < outer) & (c < channels) & (i < inner)
    offsets = o.to(tl.int64) * stride_o + c * stride_c + i * stride_i
    return offsets, mask


@triton.jit
def _channel_params(
    c_start,
    channels,
    mean_ptr,
    spread_ptr,
    weight_ptr,
    bias_ptr,
    eps,
    ACC: tl.constexpr,
    FROM_VAR: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Per-channel mean, 1/σ, scale (1/σ·γ) and shift (β), shaped [1, BLOCK_C, 1].

    ``spread_ptr`` holds 1/σ (training) or the running variance (eval, ``FROM_VAR``).
    """
    cs = c_start + tl.arange(0, BLOCK_C)
    cmask = cs < channels
    mean = tl.load(mean_ptr + cs, mask=cmask, other=0.0).to(ACC)
    spread = tl.load(spread_ptr + cs, mask=cmask, other=1.0).to(ACC)
    invstd = 1.0 / tl.sqrt(spread + eps) if FROM_VAR else spread
    scale = invstd
    if HAS_WEIGHT:
        scale = invstd * tl.load(weight_ptr + cs, mask=cmask, other=1.0).to(ACC)
    shift = tl.zeros([BLOCK_C], dtype=ACC)
    if HAS_BIAS:
        shift = tl.load(bias_ptr + cs, mask=cmask, other=0.0).to(ACC)
    return mean[None, :, None], invstd[None, :, None], scale[None, :, None], shift[None, :, None]


# --------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _partial_stats_kernel(
    x_ptr,
    partial_ptr,
    outer,
    channels,
    inner,
    stride_o,
    stride_c,
    stride_i,
    num_i_blocks,
    num_chunks,
    chunks_per_split,
    stride_stat,
    stride_split,
    ACC: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """(count, mean, M2) per channel over one split's chunks: Welford over tiles."""
    c_start = tl.program_id(0) * BLOCK_C
    split = tl.program_id(1)
    count = tl.zeros([BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    first = split * chunks_per_split
    last = tl.minimum(first + chunks_per_split, num_chunks)
    for chunk in range(first, last):
        offsets, mask = _tile(
            chunk, c_start, outer, channels, inner, stride_o, stride_c, stride_i, num_i_blocks,
            BLOCK_O, BLOCK_C, BLOCK_I,
        )  # fmt: skip
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
        n = tl.sum(tl.sum(mask.to(ACC), axis=2), axis=0)
        tile_mean = tl.sum(tl.sum(x, axis=2), axis=0) / tl.maximum(n, 1.0)
        deviation = tl.where(mask, x - tile_mean[None, :, None], 0.0)
        tile_m2 = tl.sum(tl.sum(deviation * deviation, axis=2), axis=0)
        total = count + n
        delta = tile_mean - mean
        weight = n / tl.maximum(total, 1.0)
        mean += delta * weight
        m2 += tile_m2 + delta * delta * count * weight
        count = total
    cs = c_start + tl.arange(0, BLOCK_C)
    out = partial_ptr + split * stride_split + cs
    tl.store(out, count, mask=cs < channels)
    tl.store(out + stride_stat, mean, mask=cs < channels)
    tl.store(out + 2 * stride_stat, m2, mask=cs < channels)


@triton.jit
def _merge_stats_kernel(
    partial_ptr,
    P,
    channels,
    stride_stat,
    stride_part,
    stats_ptr,
    mean_ptr,
    invstd_ptr,
    unbiased_ptr,
    eps,
    ACC: tl.constexpr,
    WRITE_STATS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Merge P partial (count, mean, M2) rows into the batch mean, 1/σ and unbiased variance
    (Chan et al.); optionally also the merged (count, mean, M2) (a process's share under sync)."""
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < channels
    count = tl.zeros([BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for p_start in range(0, P, BLOCK_P):
        ps = p_start + tl.arange(0, BLOCK_P)[:, None]
        mask = (ps < P) & cmask[None, :]
        rows = partial_ptr + ps * stride_part + cs[None, :]
        n = tl.load(rows, mask=mask, other=0.0).to(ACC)
        means = tl.load(rows + stride_stat, mask=mask, other=0.0).to(ACC)
        m2s = tl.load(rows + 2 * stride_stat, mask=mask, other=0.0).to(ACC)
        block_n = tl.sum(n, axis=0)
        block_mean = tl.sum(n * means, axis=0) / tl.maximum(block_n, 1.0)
        spread = means - block_mean[None, :]
        block_m2 = tl.sum(m2s + n * spread * spread, axis=0)
        total = count + block_n
        delta = block_mean - mean
        weight = block_n / tl.maximum(total, 1.0)
        mean += delta * weight
        m2 += block_m2 + delta * delta * count * weight
        count = total
    if WRITE_STATS:
        tl.store(stats_ptr + cs, count, mask=cmask)
        tl.store(stats_ptr + channels + cs, mean, mask=cmask)
        tl.store(stats_ptr + 2 * channels + cs, m2, mask=cmask)
    invstd = 1.0 / tl.sqrt(m2 / tl.maximum(count, 1.0) + eps)
    tl.store(mean_ptr + cs, mean, mask=cmask)
    tl.store(invstd_ptr + cs, invstd, mask=cmask)
    unbiased = m2 / tl.maximum(count - 1.0, 1.0)
    tl.store(unbiased_ptr + cs, unbiased, mask=cmask)


@triton.jit
def _normalize_kernel(
    x_ptr,
    y_ptr,
    mean_ptr,
    spread_ptr,
    weight_ptr,
    bias_ptr,
    outer,
    channels,
    inner,
    stride_o,
    stride_c,
    stride_i,
    num_i_blocks,
    eps,
    slope,
    ACC: tl.constexpr,
    FROM_VAR: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """y = act((x − μ)·γ/σ + β) for one tile."""
    chunk = tl.program_id(0)
    c_start = tl.program_id(1) * BLOCK_C
    mean, _, scale, shift = _channel_params(
        c_start, channels, mean_ptr, spread_ptr, weight_ptr, bias_ptr, eps,
        ACC, FROM_VAR, HAS_WEIGHT, HAS_BIAS, BLOCK_C,
    )  # fmt: skip
    offsets, mask = _tile(
        chunk, c_start, outer, channels, inner, stride_o, stride_c, stride_i, num_i_blocks,
        BLOCK_O, BLOCK_C, BLOCK_I,
    )  # fmt: skip
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
    y = _activate((x - mean) * scale + shift, ACT, slope)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _partial_grad_sums_kernel(
    dy_ptr,
    x_ptr,
    partial_ptr,
    mean_ptr,
    spread_ptr,
    weight_ptr,
    bias_ptr,
    outer,
    channels,
    inner,
    stride_o,
    stride_c,
    stride_i,
    num_i_blocks,
    num_chunks,
    chunks_per_split,
    stride_stat,
    stride_split,
    eps,
    slope,
    ACC: tl.constexpr,
    FROM_VAR: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """Σdz and Σdz·x̂ per channel over one split's chunks (dz: the gradient through act)."""
    c_start = tl.program_id(0) * BLOCK_C
    split = tl.program_id(1)
    mean, invstd, scale, shift = _channel_params(
        c_start, channels, mean_ptr, spread_ptr, weight_ptr, bias_ptr, eps,
        ACC, FROM_VAR, HAS_WEIGHT, HAS_BIAS, BLOCK_C,
    )  # fmt: skip
    sum_dz = tl.zeros([BLOCK_C], dtype=ACC)
    sum_dz_xhat = tl.zeros([BLOCK_C], dtype=ACC)
    first = split * chunks_per_split
    last = tl.minimum(first + chunks_per_split, num_chunks)
    for chunk in range(first, last):
        offsets, mask = _tile(
            chunk, c_start, outer, channels, inner, stride_o, stride_c, stride_i, num_i_blocks,
            BLOCK_O, BLOCK_C, BLOCK_I,
        )  # fmt: skip
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(ACC)
        centred = x - mean
        dz = _activation_grad(dy, centred * scale + shift, ACT, slope)
        dz = tl.where(mask, dz, 0.0)
        sum_dz += tl.sum(tl.sum(dz, axis=2), axis=0)
        sum_dz_xhat += tl.sum(tl.sum(dz * centred * invstd, axis=2), axis=0)
    cs = c_start + tl.arange(0, BLOCK_C)
    out = partial_ptr + split * stride_split + cs
    tl.store(out, sum_dz, mask=cs < channels)
    tl.store(out + stride_stat, sum_dz_xhat, mask=cs < channels)


@triton.jit
def _grad_input_kernel(
    dy_ptr,
    x_ptr,
    dx_ptr,
    mean_ptr,
    spread_ptr,
    weight_ptr,
    bias_ptr,
    mean_dz_ptr,
    mean_dz_xhat_ptr,
    outer,
    channels,
    inner,
    stride_o,
    stride_c,
    stride_i,
    num_i_blocks,
    eps,
    slope,
    ACC: tl.constexpr,
    FROM_VAR: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    BATCH_STATS: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """dx = γ/σ · (dz − mean(dz) − x̂·mean(dz·x̂)); without batch statistics just γ/σ · dz."""
    chunk = tl.program_id(0)
    c_start = tl.program_id(1) * BLOCK_C
    mean, invstd, scale, shift = _channel_params(
        c_start, channels, mean_ptr, spread_ptr, weight_ptr, bias_ptr, eps,
        ACC, FROM_VAR, HAS_WEIGHT, HAS_BIAS, BLOCK_C,
    )  # fmt: skip
    offsets, mask = _tile(
        chunk, c_start, outer, channels, inner, stride_o, stride_c, stride_i, num_i_blocks,
        BLOCK_O, BLOCK_C, BLOCK_I,
    )  # fmt: skip
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(ACC)
    centred = x - mean
    dz = _activation_grad(dy, centred * scale + shift, ACT, slope)
    if BATCH_STATS:
        cs = c_start + tl.arange(0, BLOCK_C)
        mean_dz = tl.load(mean_dz_ptr + cs, mask=cs < channels, other=0.0).to(ACC)[None, :, None]
        mean_dz_xhat = tl.load(mean_dz_xhat_ptr + cs, mask=cs < channels, other=0.0).to(ACC)
        dz = dz - mean_dz - centred * invstd * mean_dz_xhat[None, :, None]
    tl.store(dx_ptr + offsets, (dz * scale).to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Host side

# True when TRITON_INTERPRET=1 was set before this module was imported: kernels run on CPU tensors.
INTERPRETED = isinstance(_normalize_kernel, InterpretedFunction)


@dataclass(frozen=True)
class Layout:
    """How a N×C×* tensor is walked: ``[outer, channel, inner]`` sizes and element strides."""

    outer: int
    channels: int
    inner: int
    stride_outer: int
    stride_channel: int
    stride_inner: int

    @property
    def args(self) -> tuple[int, ...]:
        return (
            self.outer,
            self.channels,
            self.inner,
            self.stride_outer,
            self.stride_channel,
            self.stride_inner,
        )


def layout_of(x: Tensor) -> tuple[Tensor, Layout]:
    """``x`` (made contiguous only if it is neither contiguous nor channels-last) and its layout."""
    n, c = x.shape[:2]
    spatial = math.prod(x.shape[2:])
    if x.is_contiguous():
        return x, Layout(n, c, spatial, c * spatial, spatial, 1)
    if x.dim() > 2 and x.permute(0, *range(2, x.dim()), 1).is_contiguous():
        return x, Layout(n * spatial, c, 1, c, 1, 1)
    return layout_of(x.contiguous())


def same_layout(tensor: Tensor, like: Tensor) -> Tensor:
    """``tensor`` with the strides of ``like`` (gradients may arrive in another memory format)."""
    if tensor.stride() == like.stride():
        return tensor
    return torch.empty_like(like, dtype=tensor.dtype).copy_(tensor)


@dataclass(frozen=True)
class Plan:
    """Tile shape, chunk count and the split of each channel's chunks over programs."""

    block_o: int
    block_c: int
    block_i: int
    num_i_blocks: int
    num_chunks: int
    channel_blocks: int
    splits: int
    chunks_per_split: int


def plan_reduction(layout: Layout, programs: int, tile_elements: int) -> Plan:
    """Tile ``layout`` with about ``tile_elements`` per tile and split the reduction so that
    channel blocks × splits reaches ``programs`` (enough to occupy every SM)."""
    next_pow2 = triton.next_power_of_2
    if layout.inner == 1:  # channel axis contiguous: tiles of rows × channels
        block_c = min(next_pow2(layout.channels), 32, tile_elements)
        block_i = 1
        block_o = min(next_pow2(max(layout.outer, 1)), max(1, tile_elements // block_c))
    else:  # spatial axis contiguous: tiles of (a few images) × one channel × positions
        block_c = 1
        block_i = min(next_pow2(layout.inner), tile_elements)
        block_o = min(next_pow2(max(layout.outer, 1)), max(1, tile_elements // block_i))
    num_i_blocks = triton.cdiv(layout.inner, block_i)
    num_chunks = triton.cdiv(layout.outer, block_o) * num_i_blocks
    channel_blocks = triton.cdiv(layout.channels, block_c)
    splits = max(1, min(num_chunks, triton.cdiv(programs, channel_blocks)))
    chunks_per_split = max(1, triton.cdiv(num_chunks, splits))
    splits = max(1, triton.cdiv(num_chunks, chunks_per_split))
    return Plan(
        block_o,
        block_c,
        block_i,
        num_i_blocks,
        num_chunks,
        channel_blocks,
        splits,
        chunks_per_split,
    )


def _plan_for(x: Tensor, layout: Layout) -> Plan:
    if x.is_cuda:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        return plan_reduction(layout, programs=4 * sms, tile_elements=2048)
    # The interpreter: small tiles and a few splits, so tiny test shapes still cross every
    # chunk and split boundary.
    return plan_reduction(layout, programs=8, tile_elements=128)


def stats_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _acc(x: Tensor) -> tl.dtype:
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _blocks(plan: Plan) -> dict[str, int]:
    return {"BLOCK_O": plan.block_o, "BLOCK_C": plan.block_c, "BLOCK_I": plan.block_i}


def _flags(weight: Tensor | None, bias: Tensor | None, activation: str | None) -> dict:
    return {
        "HAS_WEIGHT": weight is not None,
        "HAS_BIAS": bias is not None,
        "ACT": ACTIVATIONS[activation],
    }


def local_stats(x: Tensor, layout: Layout) -> Tensor:
    """Per-split partial statistics ``[3 (count, mean, M2), splits, C]``."""
    plan = _plan_for(x, layout)
    partial = x.new_zeros((3, plan.splits, layout.channels), dtype=stats_dtype(x))
    if plan.num_chunks == 0 or layout.channels == 0:
        return partial
    _partial_stats_kernel[(plan.channel_blocks, plan.splits)](
        x, partial, *layout.args, plan.num_i_blocks, plan.num_chunks, plan.chunks_per_split,
        partial.stride(0), partial.stride(1), ACC=_acc(x), **_blocks(plan),
    )  # fmt: skip
    return partial


def merge_stats(
    partial: Tensor, eps: float, write_stats: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Merge ``[3, P, C]`` partials: mean, 1/σ, unbiased variance (for the running estimate) and,
    if ``write_stats``, the merged ``[3, C]`` (count, mean, M2)."""
    _, parts, channels = partial.shape
    mean, invstd, unbiased = (partial.new_empty(channels) for _ in range(3))
    stats = partial.new_empty((3, channels)) if write_stats else None
    if channels == 0:
        return mean, invstd, unbiased, stats
    block_c = min(triton.next_power_of_2(channels), 128)
    _merge_stats_kernel[(triton.cdiv(channels, block_c),)](
        partial, parts, channels, partial.stride(0), partial.stride(1),
        stats if write_stats else mean, mean, invstd, unbiased, eps,
        ACC=tl.float64 if partial.dtype == torch.float64 else tl.float32,
        WRITE_STATS=write_stats, BLOCK_P=min(triton.next_power_of_2(max(parts, 1)), 16),
        BLOCK_C=block_c,
    )  # fmt: skip
    return mean, invstd, unbiased, stats


def normalize(
    x: Tensor,
    layout: Layout,
    mean: Tensor,
    spread: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    from_var: bool,
    activation: str | None,
    negative_slope: float,
) -> Tensor:
    """act((x − mean)·γ/σ + β), in ``x``'s dtype and memory format.

    ``spread``: 1/σ, or the variance when ``from_var`` (eval mode with running statistics).
    """
    y = torch.empty_like(x)
    plan = _plan_for(x, layout)
    if x.numel() == 0:
        return y
    _normalize_kernel[(plan.num_chunks, plan.channel_blocks)](
        x, y, mean, spread, weight, bias, *layout.args, plan.num_i_blocks, eps, negative_slope,
        ACC=_acc(x), FROM_VAR=from_var, **_flags(weight, bias, activation), **_blocks(plan),
    )  # fmt: skip
    return y


def grad_sums(
    dy: Tensor,
    x: Tensor,
    layout: Layout,
    mean: Tensor,
    spread: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    from_var: bool,
    activation: str | None,
    negative_slope: float,
) -> Tensor:
    """``[2, C]``: Σdz and Σdz·x̂ per channel, where dz = dy·act'(z). ``dy`` has ``x``'s layout."""
    plan = _plan_for(x, layout)
    partial = x.new_zeros((2, plan.splits, layout.channels), dtype=stats_dtype(x))
    if x.numel() > 0:
        _partial_grad_sums_kernel[(plan.channel_blocks, plan.splits)](
            dy, x, partial, mean, spread, weight, bias, *layout.args, plan.num_i_blocks,
            plan.num_chunks, plan.chunks_per_split, partial.stride(0), partial.stride(1), eps,
            negative_slope, ACC=_acc(x), FROM_VAR=from_var, **_flags(weight, bias, activation),
            **_blocks(plan),
        )  # fmt: skip
    return partial.sum(dim=1)


def grad_input(
    dy: Tensor,
    x: Tensor,
    layout: Layout,
    mean: Tensor,
    spread: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    from_var: bool,
    activation: str | None,
    negative_slope: float,
    mean_dz: Tensor | None,
    mean_dz_xhat: Tensor | None,
) -> Tensor:
    """The input gradient; ``mean_dz``/``mean_dz_xhat`` are None when the statistics were
    constants (eval mode), so only the affine map and the activation are differentiated."""
    dx = torch.empty_like(x)
    plan = _plan_for(x, layout)
    if x.numel() == 0:
        return dx
    batch_stats = mean_dz is not None
    _grad_input_kernel[(plan.num_chunks, plan.channel_blocks)](
        dy, x, dx, mean, spread, weight, bias, mean_dz if batch_stats else mean,
        mean_dz_xhat if batch_stats else mean, *layout.args, plan.num_i_blocks, eps,
        negative_slope, ACC=_acc(x), FROM_VAR=from_var, **_flags(weight, bias, activation),
        BATCH_STATS=batch_stats, **_blocks(plan),
    )  # fmt: skip
    return dx
