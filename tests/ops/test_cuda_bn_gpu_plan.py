"""cuda_bn with the tile plan a GPU takes (4 programs per SM, 2,048-element tiles), run by Triton's
interpreter against nn.BatchNorm in float64, at small shapes that cross that plan's tile, chunk
and split boundaries (the other interpreter tests use a 128-element plan).

bf16 here means bf16 tensors in and out with fp32 arithmetic, which is what the kernels do on a
GPU too: the interpreter emulates the bf16↔fp32 conversions bit for bit (round to nearest even)
but has no bf16 arithmetic, and none is needed. What only a GPU shows: its approximate 1/sqrt and
exp, vectorised loads, and races between programs (the interpreter runs them one by one).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.ops.batchnorm import CudaBatchNorm, kernels

TORCH_BN = {2: nn.BatchNorm1d, 4: nn.BatchNorm2d}
# (shape, channels_last): rows longer than a tile (50·50 > 2,048), a masked last tile in both
# directions, channel blocks of 32 with a partial one, few channels over many positions.
SHAPES = [
    ((2, 3, 50, 50), False),
    ((2, 3, 50, 50), True),
    ((300, 2, 3, 3), False),
    ((4, 40, 7, 9), True),
    ((3000, 5), False),
]
# Multiprocessors: one (few splits with several chunks each) and an H100's 132 (a split per chunk).
MULTIPROCESSORS = [1, 132]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _channels_last(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _plan(shape, channels_last, multiprocessors) -> kernels.Plan:
    x = _channels_last(torch.empty(shape), channels_last)
    with kernels.forced_plan(kernels.gpu_plan_settings(multiprocessors)):
        return kernels._plan_for(x, kernels.layout_of(x)[1])


@pytest.mark.parametrize("multiprocessors", MULTIPROCESSORS)
@pytest.mark.parametrize(("shape", "channels_last"), SHAPES)
def test_the_shapes_cross_the_gpu_plans_boundaries(shape, channels_last, multiprocessors):
    plan = _plan(shape, channels_last, multiprocessors)
    assert plan.block_o * plan.block_c * plan.block_i > kernels.INTERPRETER_PLAN.tile_elements
    assert plan.num_chunks > 1 and plan.splits > 1, plan
    if multiprocessors == 1:
        assert plan.chunks_per_split > 1, plan


def _check_against_float64(shape, channels_last, multiprocessors, dtype, activation):
    channels = shape[1]
    reduced = [0, *range(2, len(shape))]
    generator = torch.Generator().manual_seed(0)
    truth = TORCH_BN[len(shape)](channels).double()
    with torch.no_grad():
        truth.weight.uniform_(0.5, 1.5, generator=generator)
        truth.bias.normal_(generator=generator)
    ours = CudaBatchNorm(channels, backend="triton", activation=activation)
    ours.load_state_dict(truth.state_dict())
    act = {"relu": F.relu, "silu": F.silu}[activation]
    with kernels.forced_plan(kernels.gpu_plan_settings(multiprocessors)):
        for mode in ("train", "train", "eval"):
            ours.train(mode == "train")
            truth.train(mode == "train")
            x = torch.randn(shape, generator=generator) * 2 + 0.5
            x = _channels_last(x.to(dtype), channels_last)
            dy = torch.randn(shape, generator=generator).to(dtype)
            x_ours = x.clone().requires_grad_(True)
            x_truth = x.double().requires_grad_(True)
            y_ours, y_truth = ours(x_ours), act(truth(x_truth))
            y_ours.backward(dy)
            y_truth.backward(dy.double())
            torch.testing.assert_close(y_ours, y_truth.to(dtype))
            torch.testing.assert_close(x_ours.grad, x_truth.grad.to(dtype))
            # dγ and dβ are fp32 sums of N·H·W terms that cancel: rounding moves them by a small
            # multiple of fp32's epsilon times the terms' total magnitude, not of the result.
            magnitude = dy.double().abs().sum(reduced) * (x.double().abs().amax() + 1)
            for name in ("weight", "bias"):
                got, want = getattr(ours, name).grad, getattr(truth, name).grad
                error = (got.double() - want).abs()
                assert (error <= 1e-6 * magnitude).all(), (name, error.max())
                getattr(ours, name).grad = getattr(truth, name).grad = None
            for name in ("running_mean", "running_var"):
                got, want = getattr(ours, name), getattr(truth, name)
                torch.testing.assert_close(got, want.float(), msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize(("shape", "channels_last"), [SHAPES[0], SHAPES[3]])
def test_gpu_plan_matches_batchnorm_in_float64(shape, channels_last, dtype):
    _check_against_float64(shape, channels_last, 1, dtype, "silu")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("multiprocessors", MULTIPROCESSORS)
@pytest.mark.parametrize(("shape", "channels_last"), SHAPES)
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_gpu_plan_matches_batchnorm_in_float64_every_combination(
    shape, channels_last, multiprocessors, dtype, activation
):
    _check_against_float64(shape, channels_last, multiprocessors, dtype, activation)
