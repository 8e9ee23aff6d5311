"""The BatchNorm statistics bookkeeping every BatchNorm-like layer here shares
(``normlab.ops.bn_stats``): each keeps the running averages nn.BatchNorm2d keeps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlab.norm import build_norm
from normlab.ops.bn_stats import count_training_step, step_momentum, unbiased_variance

C = 5
# In training these equal BN's batch statistics: Batch Renorm with r = 1, d = 0 and one ghost batch.
BN_LIKE = [
    {"name": "brn", "r_max": 1.0, "d_max": 0.0, "warmup_steps": 0},
    {"name": "ghost_bn", "virtual_batch_size": 64},
    "syncbn",
]


def test_unbiased_variance_is_bessel_corrected_and_zero_for_one_value() -> None:
    x = torch.randn(7, 3, dtype=torch.float64)
    biased = x.var(0, correction=0)
    torch.testing.assert_close(unbiased_variance(biased, 7), x.var(0), rtol=1e-15, atol=0)
    assert unbiased_variance(torch.zeros(3), 1).eq(0).all()


def test_a_cumulative_average_weighs_every_step_alike() -> None:
    steps = torch.tensor(0)
    factors = [count_training_step(steps, None) for _ in range(4)]
    assert factors == [1.0, 1 / 2, 1 / 3, 1 / 4] and int(steps) == 4
    assert count_training_step(steps, 0.3) == 0.3 and int(steps) == 5


def test_eval_mode_counts_no_step() -> None:
    bn = nn.BatchNorm2d(C, momentum=None).eval()
    assert step_momentum(bn) == 0.0 and int(bn.num_batches_tracked) == 0


@pytest.mark.parametrize("momentum", [0.3, None])
@pytest.mark.parametrize("spec", BN_LIKE, ids=lambda s: s if isinstance(s, str) else s["name"])
def test_running_statistics_equal_batchnorms(spec, momentum) -> None:
    generator = torch.Generator().manual_seed(0)
    name = spec if isinstance(spec, str) else spec["name"]
    options = {} if isinstance(spec, str) else {k: v for k, v in spec.items() if k != "name"}
    ours = build_norm({"name": name, "momentum": momentum, **options}, C).double()
    bn = nn.BatchNorm2d(C, momentum=momentum).double()
    for batch in (4, 2, 6):
        x = torch.randn(batch, C, 3, 2, generator=generator, dtype=torch.float64)
        ours(x), bn(x)
    assert int(ours.num_batches_tracked) == int(bn.num_batches_tracked) == 3
    torch.testing.assert_close(ours.running_mean, bn.running_mean, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(ours.running_var, bn.running_var, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("momentum", [0.3, None])
def test_evonorm_b0_keeps_batchnorms_running_variance(momentum) -> None:
    generator = torch.Generator().manual_seed(1)
    evo = build_norm({"name": "evonorm_b0", "momentum": momentum}, C).double()
    bn = nn.BatchNorm2d(C, momentum=momentum).double()
    for batch in (3, 5):
        x = torch.randn(batch, C, 4, 4, generator=generator, dtype=torch.float64)
        evo(x), bn(x)
    assert int(evo.num_batches_tracked) == 2
    torch.testing.assert_close(evo.running_var, bn.running_var, rtol=1e-13, atol=1e-15)
