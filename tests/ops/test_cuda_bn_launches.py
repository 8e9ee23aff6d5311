"""cuda_bn's launches, recorded from the real host code (normlab.ops.batchnorm.launches): how many
a layer makes, that nothing else runs between them, and that every grid fits CUDA's limits — at
the GPU's tile plan too, and at shapes too large to compute here."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from normlab.ops.batchnorm import kernels, ops
from normlab.ops.batchnorm.aot import FULL_SHAPES
from normlab.ops.batchnorm.launches import LayerConfig, record_launches, record_layer

H100 = kernels.gpu_plan_settings(132)
PLANS = {"interpreter": kernels.INTERPRETER_PLAN, "h100": H100}
TRAIN_FORWARD = ["_partial_stats_kernel", "_merge_stats_kernel", "_normalize_kernel"]
BACKWARD = ["_partial_grad_sums_kernel", "_finish_grad_sums_kernel", "_grad_input_kernel"]


def _names(launches) -> list[str]:
    return [launch.kernel for launch in launches]


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
@pytest.mark.parametrize(
    "config",
    [
        LayerConfig((4, 6, 5, 5)),
        LayerConfig((4, 6, 5, 5), channels_last=True, dtype=torch.bfloat16, activation="silu"),
        LayerConfig((4, 6, 5, 5), affine=False, activation="relu"),
        LayerConfig((3, 7), dtype=torch.float16, half_weights=True),
    ],
    ids=lambda config: config.describe(),
)
def test_three_launches_forward_and_three_backward(plan, config):
    with kernels.forced_plan(plan):
        recorded = record_layer(config)
    assert _names(recorded.train_forward) == TRAIN_FORWARD
    assert _names(recorded.backward) == BACKWARD
    assert _names(recorded.eval_forward) == ["_normalize_kernel"]


# Allocations and views: the only PyTorch operators a layer may run besides our kernels.
NO_DEVICE_WORK = {"aten::empty", "aten::empty_strided", "aten::as_strided", "detach"}


def test_no_memset_copy_or_reduction_outside_the_kernels():
    """The running statistics, the reduction of the partial sums and dγ/dβ are kernels' work:
    a profile of a training step holds no PyTorch operator that would launch a device kernel."""
    x = torch.randn(4, 6, 5, 5, requires_grad=True)
    weight = torch.ones(6, requires_grad=True)
    bias = torch.zeros(6, requires_grad=True)
    running = (torch.zeros(6), torch.ones(6))
    grad = torch.randn(4, 6, 5, 5)
    with record_launches() as launches, profile(activities=[ProfilerActivity.CPU]) as profiler:
        y = ops.batch_norm(x, weight, bias, *running, True, 0.1, 1e-5, "relu")
        y.backward(grad)
    assert _names(launches) == TRAIN_FORWARD + BACKWARD
    leaves = {event.name for event in profiler.events() if not event.cpu_children}
    assert leaves - NO_DEVICE_WORK == set(), "operators besides the kernels"


def test_eval_backward_launches_only_what_the_gradients_need():
    x = torch.randn(4, 6, 5, 5, requires_grad=True)
    weight = torch.ones(6, requires_grad=True)
    running = (torch.zeros(6), torch.ones(6))
    with record_launches() as launches:
        ops.batch_norm(x, weight, None, *running, False, 0.1, 1e-5).sum().backward()
    assert _names(launches) == ["_normalize_kernel", *BACKWARD]
    weight.requires_grad_(False)
    with record_launches() as launches:
        ops.batch_norm(x, weight, None, *running, False, 0.1, 1e-5).sum().backward()
    assert _names(launches) == ["_normalize_kernel", "_grad_input_kernel"]


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
@pytest.mark.parametrize(
    "config",
    [
        *(LayerConfig(shape, channels_last) for shape in FULL_SHAPES for channels_last in (0, 1)),
        LayerConfig((2, 100_000, 2, 2)),  # one channel per block: more than grid axis 1 allows
        LayerConfig((2, 100_000, 3, 3), channels_last=True),
        LayerConfig((3, 70_000)),
        LayerConfig((2, 70_000, 2, 2, 2), channels_last=True),
        LayerConfig((4, 70_000, 2, 2), ranks=32),
        LayerConfig((32, 64, 112, 112), ranks=8),
    ],
    ids=lambda config: config.describe(),
)
def test_every_grid_fits_cuda_limits(plan, config):
    with kernels.forced_plan(plan):
        recorded = record_layer(config)
    errors = [error for launch in recorded.all() for error in launch.grid_errors()]
    assert errors == []


def test_sync_adds_only_the_share_merge():
    with kernels.forced_plan(H100):
        recorded = record_layer(LayerConfig((4, 6, 5, 5), ranks=8))
    assert _names(recorded.train_forward) == [
        "_partial_stats_kernel",
        "_merge_stats_kernel",  # this process's (count, mean, M2), for the all-gather
        "_merge_stats_kernel",  # all processes': statistics and running statistics
        "_normalize_kernel",
    ]
    assert _names(recorded.backward) == BACKWARD
