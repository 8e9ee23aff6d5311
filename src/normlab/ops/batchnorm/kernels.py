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
nothing but x is kept for it. Between the passes one tiny kernel each merges the partials: in
forward it also updates the running statistics, in backward it writes dγ, dβ and the means the
input gradient needs — three launches each way, no memsets (every split writes its partial row).
The elementwise kernels run on a 1-D grid: CUDA allows 2³¹−1 programs on axis 0, 65,535 on the
others.

One file, though long: the kernels share their tile and chunk conventions with the launch plan
below them, and splitting them would put the two halves of each convention in different files.

Under ``TRITON_INTERPRET=1`` (set before this module is imported) the same kernels run on CPU
tensors; that is how CI tests them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
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
def _tile_of_program(num_chunks, BLOCK_C: tl.constexpr):
    """(chunk, first channel) of an elementwise program. The grid is 1-D, chunks of a channel
    block adjacent: axis 0 allows 2³¹−1 programs, axes 1 and 2 only 65,535 (too few channels)."""
    pid = tl.program_id(0).to(tl.int64)
    return pid % num_chunks, (pid // num_chunks) * BLOCK_C


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
    out_ptr,
    running_mean_ptr,
    running_var_ptr,
    momentum,
    eps,
    ACC: tl.constexpr,
    SHARE: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Merge P partial (count, mean, M2) rows (Chan et al.) into ``out`` ``[3, C]``: (count, mean,
    1/σ) for normalising, or with ``SHARE`` the merged (count, mean, M2) — a process's share under
    sync. ``UPDATE_RUNNING`` also moves the running statistics towards the batch's mean and
    unbiased variance (channels that saw no value keep theirs), as ``Tensor.lerp_`` does."""
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
    tl.store(out_ptr + cs, count, mask=cmask)
    tl.store(out_ptr + channels + cs, mean, mask=cmask)
    if SHARE:
        tl.store(out_ptr + 2 * channels + cs, m2, mask=cmask)
    else:
        invstd = 1.0 / tl.sqrt(m2 / tl.maximum(count, 1.0) + eps)
        tl.store(out_ptr + 2 * channels + cs, invstd, mask=cmask)
    if UPDATE_RUNNING:
        update = cmask & (count > 0)
        unbiased = m2 / tl.maximum(count - 1.0, 1.0)
        _lerp_in_place(running_mean_ptr + cs, mean, momentum, update)
        _lerp_in_place(running_var_ptr + cs, unbiased, momentum, update)


@triton.jit
def _lerp_in_place(ptr, end, weight, mask):
    """``ptr ← lerp(ptr, end, weight)`` with ``end`` first rounded to ``ptr``'s dtype and the
    arithmetic of ``Tensor.lerp_`` (fp32 for half buffers), so buffers match BatchNorm's."""
    compute = tl.float64 if ptr.dtype.element_ty == tl.float64 else tl.float32
    start = tl.load(ptr, mask=mask, other=0.0).to(compute)
    end = end.to(ptr.dtype.element_ty).to(compute)
    difference = end - start
    result = tl.where(weight < 0.5, start + weight * difference, end - difference * (1.0 - weight))
    tl.store(ptr, result.to(ptr.dtype.element_ty), mask=mask)


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
    num_chunks,
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
    chunk, c_start = _tile_of_program(num_chunks, BLOCK_C)
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
def _finish_grad_sums_kernel(
    partial_ptr,
    P,
    channels,
    stride_stat,
    stride_part,
    means_ptr,
    count_ptr,
    grad_weight_ptr,
    grad_bias_ptr,
    ACC: tl.constexpr,
    MEANS: tl.constexpr,
    GRAD_WEIGHT: tl.constexpr,
    GRAD_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Sum P partial (Σdz, Σdz·x̂) rows: dβ = Σdz and dγ = Σdz·x̂ in the parameters' dtypes and,
    with ``MEANS``, ``means`` ``[2, C]`` = both sums over the count at ``count_ptr`` (per channel:
    the batch's, or under sync all processes' — each process's share then adds up to the mean)."""
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < channels
    sum_dz = tl.zeros([BLOCK_C], dtype=ACC)
    sum_dz_xhat = tl.zeros([BLOCK_C], dtype=ACC)
    for p_start in range(0, P, BLOCK_P):
        ps = p_start + tl.arange(0, BLOCK_P)[:, None]
        mask = (ps < P) & cmask[None, :]
        rows = partial_ptr + ps * stride_part + cs[None, :]
        sum_dz += tl.sum(tl.load(rows, mask=mask, other=0.0).to(ACC), axis=0)
        sum_dz_xhat += tl.sum(tl.load(rows + stride_stat, mask=mask, other=0.0).to(ACC), axis=0)
    if GRAD_WEIGHT:
        tl.store(grad_weight_ptr + cs, sum_dz_xhat.to(grad_weight_ptr.dtype.element_ty), mask=cmask)
    if GRAD_BIAS:
        tl.store(grad_bias_ptr + cs, sum_dz.to(grad_bias_ptr.dtype.element_ty), mask=cmask)
    if MEANS:
        count = tl.maximum(tl.load(count_ptr + cs, mask=cmask, other=1.0).to(ACC), 1.0)
        tl.store(means_ptr + cs, sum_dz / count, mask=cmask)
        tl.store(means_ptr + channels + cs, sum_dz_xhat / count, mask=cmask)


@triton.jit
def _grad_input_kernel(
    dy_ptr,
    x_ptr,
    dx_ptr,
    mean_ptr,
    spread_ptr,
    weight_ptr,
    bias_ptr,
    means_ptr,
    outer,
    channels,
    inner,
    stride_o,
    stride_c,
    stride_i,
    num_i_blocks,
    num_chunks,
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
    """dx = γ/σ · (dz − mean(dz) − x̂·mean(dz·x̂)); without batch statistics just γ/σ · dz.

    ``means_ptr``: ``[2, C]`` mean(dz) and mean(dz·x̂) (only read with ``BATCH_STATS``)."""
    chunk, c_start = _tile_of_program(num_chunks, BLOCK_C)
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
        mean_dz = tl.load(means_ptr + cs, mask=cs < channels, other=0.0).to(ACC)[None, :, None]
        mean_dz_xhat = tl.load(means_ptr + channels + cs, mask=cs < channels, other=0.0).to(ACC)
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


@dataclass(frozen=True)
class PlanSettings:
    """What :func:`plan_reduction` aims for: programs to keep busy and elements per tile."""

    programs: int
    tile_elements: int


def gpu_plan_settings(multiprocessors: int) -> PlanSettings:
    """A GPU's plan: four programs per SM, 2,048-element tiles."""
    return PlanSettings(programs=4 * multiprocessors, tile_elements=2048)


# The interpreter's plan: small tiles and a few splits, so tiny test shapes still cross every
# chunk and split boundary.
INTERPRETER_PLAN = PlanSettings(programs=8, tile_elements=128)

_forced_plan: PlanSettings | None = None


@contextmanager
def forced_plan(settings: PlanSettings) -> Iterator[None]:
    """Plan every launch with ``settings`` whatever the device: the GPU's plan on CPU tensors
    (interpreter tests, recording the launches a GPU would get)."""
    global _forced_plan
    previous, _forced_plan = _forced_plan, settings
    try:
        yield
    finally:
        _forced_plan = previous


def _plan_for(x: Tensor, layout: Layout) -> Plan:
    settings = _forced_plan
    if settings is None and x.is_cuda:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        settings = gpu_plan_settings(sms)
    settings = settings or INTERPRETER_PLAN
    return plan_reduction(layout, settings.programs, settings.tile_elements)


def stats_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _acc(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _blocks(plan: Plan) -> dict[str, int]:
    return {"BLOCK_O": plan.block_o, "BLOCK_C": plan.block_c, "BLOCK_I": plan.block_i}


def _flags(weight: Tensor | None, bias: Tensor | None, activation: str | None) -> dict:
    return {
        "HAS_WEIGHT": weight is not None,
        "HAS_BIAS": bias is not None,
        "ACT": ACTIVATIONS[activation],
    }


def _per_channel_blocks(parts: int, channels: int) -> dict[str, int]:
    """Grid-free block sizes of the small kernels that reduce ``parts`` rows per channel."""
    return {
        "BLOCK_P": min(triton.next_power_of_2(max(parts, 1)), 16),
        "BLOCK_C": min(triton.next_power_of_2(max(channels, 1)), 128),
    }


def local_stats(x: Tensor, layout: Layout) -> Tensor:
    """Per-split partial statistics ``[3 (count, mean, M2), splits, C]``. Every split writes its
    row (zeros for an empty batch), so the buffer needs no clearing."""
    plan = _plan_for(x, layout)
    partial = x.new_empty((3, plan.splits, layout.channels), dtype=stats_dtype(x))
    if layout.channels == 0:
        return partial
    _partial_stats_kernel[(plan.channel_blocks, plan.splits)](
        x, partial, *layout.args, plan.num_i_blocks, plan.num_chunks, plan.chunks_per_split,
        partial.stride(0), partial.stride(1), ACC=_acc(x.dtype), **_blocks(plan),
    )  # fmt: skip
    return partial


def merge_stats(
    partial: Tensor,
    eps: float,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    momentum: float = 0.0,
    share: bool = False,
) -> Tensor:
    """Merge ``[3, P, C]`` partials into ``[3, C]``: (count, mean, 1/σ), or with ``share`` the
    merged (count, mean, M2). Given running buffers, also updates them in place (momentum)."""
    _, parts, channels = partial.shape
    stats = partial.new_empty((3, channels))
    if channels == 0:
        return stats
    update_running = running_mean is not None and running_var is not None
    blocks = _per_channel_blocks(parts, channels)
    _merge_stats_kernel[(triton.cdiv(channels, blocks["BLOCK_C"]),)](
        partial, parts, channels, partial.stride(0), partial.stride(1), stats,
        running_mean if update_running else stats, running_var if update_running else stats,
        momentum, eps, ACC=_acc(partial.dtype), SHARE=share, UPDATE_RUNNING=update_running,
        **blocks,
    )  # fmt: skip
    return stats


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
    _normalize_kernel[(plan.num_chunks * plan.channel_blocks,)](
        x, y, mean, spread, weight, bias, *layout.args, plan.num_i_blocks, plan.num_chunks, eps,
        negative_slope, ACC=_acc(x.dtype), FROM_VAR=from_var, **_flags(weight, bias, activation),
        **_blocks(plan),
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
    """``[2, splits, C]``: per-split Σdz and Σdz·x̂, where dz = dy·act'(z) (``dy`` has ``x``'s
    layout); every split writes its row."""
    plan = _plan_for(x, layout)
    partial = x.new_empty((2, plan.splits, layout.channels), dtype=stats_dtype(x))
    if layout.channels == 0:
        return partial
    _partial_grad_sums_kernel[(plan.channel_blocks, plan.splits)](
        dy, x, partial, mean, spread, weight, bias, *layout.args, plan.num_i_blocks,
        plan.num_chunks, plan.chunks_per_split, partial.stride(0), partial.stride(1), eps,
        negative_slope, ACC=_acc(x.dtype), FROM_VAR=from_var, **_flags(weight, bias, activation),
        **_blocks(plan),
    )  # fmt: skip
    return partial


def finish_grad_sums(
    partial: Tensor,
    count: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """From :func:`grad_sums`' partials: (``[2, C]`` mean(dz) and mean(dz·x̂) over the per-channel
    ``count`` — None without a count —, dγ, dβ — None without the parameter)."""
    _, parts, channels = partial.shape
    means = partial.new_empty((2, channels)) if count is not None else None
    grad_weight = torch.empty_like(weight) if weight is not None else None
    grad_bias = torch.empty_like(bias) if bias is not None else None
    if channels == 0 or (means is None and grad_weight is None and grad_bias is None):
        return means, grad_weight, grad_bias
    blocks = _per_channel_blocks(parts, channels)
    _finish_grad_sums_kernel[(triton.cdiv(channels, blocks["BLOCK_C"]),)](
        partial, parts, channels, partial.stride(0), partial.stride(1),
        *(partial if t is None else t for t in (means, count, grad_weight, grad_bias)),
        ACC=_acc(partial.dtype), MEANS=means is not None, GRAD_WEIGHT=grad_weight is not None,
        GRAD_BIAS=grad_bias is not None, **blocks,
    )  # fmt: skip
    return means, grad_weight, grad_bias


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
    means: Tensor | None,
) -> Tensor:
    """The input gradient; ``means`` (mean(dz), mean(dz·x̂)) is None when the statistics were
    constants (eval mode), so only the affine map and the activation are differentiated."""
    dx = torch.empty_like(x)
    plan = _plan_for(x, layout)
    if x.numel() == 0:
        return dx
    batch_stats = means is not None
    _grad_input_kernel[(plan.num_chunks * plan.channel_blocks,)](
        dy, x, dx, mean, spread, weight, bias, means if batch_stats else mean, *layout.args,
        plan.num_i_blocks, plan.num_chunks, eps, negative_slope, ACC=_acc(x.dtype),
        FROM_VAR=from_var, **_flags(weight, bias, activation), BATCH_STATS=batch_stats,
        **_blocks(plan),
    )  # fmt: skip
    return dx
