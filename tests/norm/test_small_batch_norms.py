"""brn, ghost_bn, frn, evonorm_b0, evonorm_s0 and rms against float64 re-statements of their
papers' equations, their equivalences with bn, and their place in the registry, conversion,
fusion, folding and synchronisation."""

from __future__ import annotations

import copy
import logging
import math
import re
from collections.abc import Callable

import pytest
import timm.layers
import torch
from torch import Tensor, nn

from normlab.errors import ConfigError
from normlab.export import fold_norms
from normlab.norm import (
    BatchRenorm2d,
    EvoNormB0,
    EvoNormS0,
    FilterResponseNorm2d,
    GhostBatchNorm2d,
    RMSNorm2d,
    build_norm,
    convert_norms,
    norm_and_activation,
    norm_channels,
)
from normlab.norm.lightning_sync_plugin import NormSync

NEW_NORMS = {
    "brn": BatchRenorm2d,
    "ghost_bn": GhostBatchNorm2d,
    "frn": FilterResponseNorm2d,
    "evonorm_b0": EvoNormB0,
    "evonorm_s0": EvoNormS0,
    "rms": RMSNorm2d,
}
C = 6


def _randomize(module: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.rand(parameter.shape, generator=generator, dtype=parameter.dtype))
            parameter.add_(0.5)  # positive: weights, thresholds and v away from 0


def _check_step(
    module: nn.Module,
    reference: Callable[[Tensor, dict[str, Tensor]], Tensor],
    x: Tensor,
    generator: torch.Generator,
) -> None:
    """One forward/backward of ``module`` against ``reference(x, params)`` in float64: outputs,
    input gradients and parameter gradients."""
    x_module = x.clone().requires_grad_(True)
    x_reference = x.clone().requires_grad_(True)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in module.named_parameters()}
    module.zero_grad()
    y = module(x_module)
    expected = reference(x_reference, params)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    upstream = torch.randn(y.shape, generator=generator, dtype=torch.float64)
    y.backward(upstream)
    expected.backward(upstream)
    torch.testing.assert_close(x_module.grad, x_reference.grad, rtol=1e-9, atol=1e-11)
    for name, parameter in module.named_parameters():
        torch.testing.assert_close(parameter.grad, params[name].grad, rtol=1e-9, atol=1e-11)


def _channel(v: Tensor, ndim: int = 4) -> Tensor:
    return v.reshape(1, -1, *([1] * (ndim - 2)))


# -- Batch Renormalization -------------------------------------------------------------------------


def _paper_limits(step: int, r_max: float, d_max: float, warmup: int, ramp: int) -> tuple:
    """The schedule as documented: BN for ``warmup`` steps, then a linear ramp over ``ramp``."""
    if step < warmup:
        fraction = 0.0
    elif ramp == 0:
        fraction = 1.0
    else:
        fraction = min((step - warmup) / ramp, 1.0)
    return 1 + (r_max - 1) * fraction, d_max * fraction


def test_brn_equals_its_paper_over_warmup_ramp_and_clipping_both_ways():
    generator = torch.Generator().manual_seed(0)
    r_max, d_max, warmup, ramp, eps, momentum = 2.0, 0.5, 2, 3, 1e-5, 0.3
    brn = BatchRenorm2d(C, eps, momentum, True, r_max, d_max, warmup, ramp).double()
    _randomize(brn, generator)
    running_mean = torch.zeros(C, dtype=torch.float64)
    running_var = torch.ones(C, dtype=torch.float64)
    # Channel scales and offsets far from the running statistics, both ways, so r and d clip at
    # both ends once the limits open.
    scales = torch.tensor([0.1, 0.3, 1.0, 3.0, 10.0, 1.0], dtype=torch.float64)
    offsets = torch.tensor([-5.0, 0.0, 0.1, 0.0, 5.0, -0.1], dtype=torch.float64)
    clipped = {"r_low": False, "r_high": False, "d_low": False, "d_high": False}
    for step in range(7):
        x = torch.randn(5, C, 4, 3, generator=generator, dtype=torch.float64)
        if step == 6:  # the channels' scales and offsets swap: r and d clip the other way
            scales, offsets = scales.flip(0), offsets.flip(0)
        x = x * _channel(scales) + _channel(offsets)
        limit_r, limit_d = _paper_limits(step, r_max, d_max, warmup, ramp)
        mean = x.mean((0, 2, 3))
        var = x.var((0, 2, 3), unbiased=False)
        r_raw = torch.sqrt(var + eps) / torch.sqrt(running_var + eps)
        d_raw = (mean - running_mean) / torch.sqrt(running_var + eps)
        r = r_raw.clamp(1 / limit_r, limit_r)
        d = d_raw.clamp(-limit_d, limit_d)
        if step >= warmup + ramp:
            clipped["r_low"] |= bool((r_raw < 1 / limit_r).any())
            clipped["r_high"] |= bool((r_raw > limit_r).any())
            clipped["d_low"] |= bool((d_raw < -limit_d).any())
            clipped["d_high"] |= bool((d_raw > limit_d).any())

        def reference(x: Tensor, p: dict[str, Tensor], r: Tensor = r, d: Tensor = d) -> Tensor:
            batch_mean = x.mean((0, 2, 3), keepdim=True)
            batch_std = torch.sqrt(x.var((0, 2, 3), unbiased=False, keepdim=True) + eps)
            x_hat = (x - batch_mean) / batch_std * _channel(r) + _channel(d)
            return _channel(p["weight"]) * x_hat + _channel(p["bias"])

        assert brn.current_limits() == pytest.approx((limit_r, limit_d))
        _check_step(brn, reference, x, generator)
        n = x.numel() / C
        running_mean = (1 - momentum) * running_mean + momentum * mean
        running_var = (1 - momentum) * running_var + momentum * var * n / (n - 1)
        torch.testing.assert_close(brn.running_mean, running_mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(brn.running_var, running_var, rtol=1e-12, atol=1e-14)
        assert int(brn.num_batches_tracked) == step + 1
    assert all(clipped.values()), clipped
    brn.eval()  # BN's eval: the running statistics
    x = torch.randn(3, C, 2, 2, generator=generator, dtype=torch.float64)
    expected = (x - _channel(running_mean)) / torch.sqrt(_channel(running_var) + eps)
    expected = expected * _channel(brn.weight) + _channel(brn.bias)
    torch.testing.assert_close(brn(x), expected, rtol=1e-12, atol=1e-12)


def _bn_pair(other: nn.BatchNorm2d, generator: torch.Generator) -> tuple[nn.Module, nn.Module]:
    bn = nn.BatchNorm2d(C, momentum=other.momentum).double()
    other = other.double()
    _randomize(bn, generator)
    other.load_state_dict(bn.state_dict())
    return bn, other


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize(
    "make",
    [
        lambda m: BatchRenorm2d(C, momentum=m, r_max=1.0, d_max=0.0, warmup_steps=0),
        lambda m: GhostBatchNorm2d(C, virtual_batch_size=8, momentum=m),
    ],
    ids=["brn_r1_d0", "ghost_bn_virtual_ge_batch"],
)
def test_equals_bn_outputs_gradients_and_statistics(make, momentum):
    generator = torch.Generator().manual_seed(1)
    bn, other = _bn_pair(make(momentum), generator)
    for _ in range(3):
        x = torch.randn(8, C, 3, 3, generator=generator, dtype=torch.float64) * 2 + 1
        upstream = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        outputs = []
        for module in (bn, other):
            x_in = x.clone().requires_grad_(True)
            module.zero_grad()
            y = module(x_in)
            y.backward(upstream)
            outputs.append((y, x_in.grad, module.weight.grad, module.bias.grad))
        for expected, got in zip(*outputs, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        for name, buffer in bn.named_buffers():
            torch.testing.assert_close(other.get_buffer(name), buffer, rtol=1e-12, atol=0)


# -- Ghost Batch Normalization -------------------------------------------------------------------


def test_ghost_bn_equals_per_chunk_bn_with_pooled_running_statistics():
    generator = torch.Generator().manual_seed(2)
    eps, momentum, virtual = 1e-5, 0.2, 4
    ghost = GhostBatchNorm2d(C, virtual, eps, momentum).double()
    _randomize(ghost, generator)
    running_mean = torch.zeros(C, dtype=torch.float64)
    running_var = torch.ones(C, dtype=torch.float64)
    for batch in (10, 8, 9):  # chunks 4+4+2, 4+4, 4+4+1 (a 1-sample chunk of 3×3 pixels)
        x = torch.randn(batch, C, 3, 3, generator=generator, dtype=torch.float64) * 3 - 1

        def reference(x: Tensor, p: dict[str, Tensor]) -> Tensor:
            chunks = []
            for chunk in x.split(virtual):
                mean = chunk.mean((0, 2, 3), keepdim=True)
                var = chunk.var((0, 2, 3), unbiased=False, keepdim=True)
                chunks.append((chunk - mean) / torch.sqrt(var + eps))
            return _channel(p["weight"]) * torch.cat(chunks) + _channel(p["bias"])

        _check_step(ghost, reference, x, generator)
        chunks = list(x.split(virtual))
        counts = [chunk.shape[0] * 9 for chunk in chunks]
        # Pooled within-chunk variance: Σ (n_k − 1)·s_k² / Σ (n_k − 1), s_k² unbiased.
        pooled = sum(
            (n - 1) * c.var((0, 2, 3), unbiased=True) for n, c in zip(counts, chunks, strict=True)
        ) / (sum(counts) - len(counts))
        running_mean = (1 - momentum) * running_mean + momentum * x.mean((0, 2, 3))
        running_var = (1 - momentum) * running_var + momentum * pooled
        torch.testing.assert_close(ghost.running_mean, running_mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ghost.running_var, running_var, rtol=1e-12, atol=1e-14)
    assert int(ghost.num_batches_tracked) == 3


def test_ghost_bn_joins_a_remainder_with_one_value_per_channel_to_the_chunk_before():
    generator = torch.Generator().manual_seed(14)
    ghost = GhostBatchNorm2d(C, virtual_batch_size=4).double()
    x = torch.randn(9, C, 1, 1, generator=generator, dtype=torch.float64)  # chunks 4 and 4 + 1
    chunks = [x[:4], x[4:]]
    expected = torch.cat(
        [(c - c.mean(0)) / torch.sqrt(c.var(0, unbiased=False) + ghost.eps) for c in chunks]
    )
    torch.testing.assert_close(ghost(x), expected, rtol=1e-12, atol=1e-12)
    # One sample of 1×1 is still a batch BN cannot normalise: torch's own error, as for bn.
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        ghost(x[:1])


def test_state_dicts_round_trip_between_bn_brn_and_ghost_bn():
    generator = torch.Generator().manual_seed(3)
    bn = nn.BatchNorm2d(C)
    _randomize(bn, generator)
    bn(torch.randn(4, C, 3, 3, generator=generator))  # running statistics off their defaults
    brn, ghost, back = BatchRenorm2d(C), GhostBatchNorm2d(C), nn.BatchNorm2d(C)
    brn.load_state_dict(bn.state_dict())
    ghost.load_state_dict(brn.state_dict())
    back.load_state_dict(ghost.state_dict())
    x = torch.randn(2, C, 3, 3, generator=generator)
    expected = bn.eval()(x)
    for module in (brn, ghost, back):
        torch.testing.assert_close(module.eval()(x), expected, rtol=0, atol=0)
    for name, tensor in bn.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor)


# -- FRN + TLU ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("learnable_eps", [False, True])
@pytest.mark.parametrize("tlu", [True, False])
def test_frn_equals_its_paper(learnable_eps, tlu):
    generator = torch.Generator().manual_seed(4)
    eps = -1e-3  # the paper's |ε|: a negative eps means its absolute value
    frn = FilterResponseNorm2d(C, eps, learnable_eps=learnable_eps, tlu=tlu).double()
    _randomize(frn, generator)
    if tlu:  # thresholds inside the output range, so that the max picks both sides
        with torch.no_grad():
            frn.tau.fill_(0.9)

    def reference(x: Tensor, p: dict[str, Tensor]) -> Tensor:
        nu2 = (x**2).mean((2, 3), keepdim=True)
        epsilon = abs(eps) + (p["learned_eps"].abs() if learnable_eps else 0.0)
        y = _channel(p["weight"]) * x / torch.sqrt(nu2 + epsilon) + _channel(p["bias"])
        return torch.maximum(y, _channel(p["tau"])) if tlu else y

    for _ in range(2):
        x = torch.randn(3, C, 4, 4, generator=generator, dtype=torch.float64)
        _check_step(frn, reference, x, generator)


def test_frn_matches_timm_in_float32():
    generator = torch.Generator().manual_seed(5)
    ours = FilterResponseNorm2d(C, eps=1e-5)
    _randomize(ours, generator)
    theirs = timm.layers.FilterResponseNormTlu2d(C, eps=1e-5)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, C, 5, 5, generator=generator)
    torch.testing.assert_close(ours(x), theirs(x))


# -- EvoNorm -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None])
def test_evonorm_b0_equals_its_paper_with_bn_running_variance(momentum):
    generator = torch.Generator().manual_seed(6)
    eps = 1e-5
    evo = EvoNormB0(C, eps, momentum).double()
    _randomize(evo, generator)
    with torch.no_grad():
        evo.v.sub_(1.0)  # v in [-0.5, 0.5): both sides of the max are taken
    running_var = torch.ones(C, dtype=torch.float64)

    def reference(x: Tensor, p: dict[str, Tensor], batch_var: Tensor | None = None) -> Tensor:
        if batch_var is None:
            batch_var = x.var((0, 2, 3), unbiased=False)
        instance_std = torch.sqrt(x.var((2, 3), unbiased=False, keepdim=True) + eps)
        denominator = torch.maximum(
            _channel(torch.sqrt(batch_var + eps)), _channel(p["v"]) * x + instance_std
        )
        return x / denominator * _channel(p["weight"]) + _channel(p["bias"])

    sides = set()
    for step in range(3):
        x = torch.randn(4, C, 3, 3, generator=generator, dtype=torch.float64) * 2
        _check_step(evo, reference, x, generator)
        params = dict(evo.named_parameters())
        instance_side = params["v"].view(1, -1, 1, 1) * x + torch.sqrt(
            x.var((2, 3), unbiased=False, keepdim=True) + eps
        )
        batch_side = torch.sqrt(x.var((0, 2, 3), unbiased=False) + eps).view(1, -1, 1, 1)
        sides |= set((instance_side > batch_side).flatten().tolist())
        n = x.numel() / C
        factor = 1 / (step + 1) if momentum is None else momentum
        running_var = (1 - factor) * running_var + factor * x.var((0, 2, 3), unbiased=True)
        torch.testing.assert_close(evo.running_var, running_var, rtol=1e-12, atol=1e-14)
        assert n > 1
    assert sides == {True, False}
    evo.eval()
    x = torch.randn(2, C, 3, 3, generator=generator, dtype=torch.float64)
    params = {name: p.detach() for name, p in evo.named_parameters()}
    torch.testing.assert_close(evo(x), reference(x, params, running_var), rtol=1e-12, atol=1e-12)


def test_evonorm_b0_matches_timm_in_float32():
    generator = torch.Generator().manual_seed(7)
    ours = EvoNormB0(C, eps=1e-3)
    _randomize(ours, generator)
    theirs = timm.layers.EvoNorm2dB0(C, eps=1e-3)
    theirs.load_state_dict(ours.state_dict(), strict=False)  # timm keeps no step count
    for _ in range(2):
        x = torch.randn(4, C, 5, 5, generator=generator)
        torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x))


def test_evonorm_s0_equals_its_paper():
    generator = torch.Generator().manual_seed(8)
    eps, groups = 1e-5, 3
    evo = build_norm({"name": "evonorm_s0", "num_groups": groups}, C).double()
    _randomize(evo, generator)

    def reference(x: Tensor, p: dict[str, Tensor]) -> Tensor:
        n = x.shape[0]
        group_var = x.reshape(n, groups, -1).var(-1, unbiased=False)  # N × G
        group_std = torch.sqrt(group_var + eps).repeat_interleave(C // groups, 1)
        gated = x * torch.sigmoid(_channel(p["v"]) * x)
        return gated / group_std[:, :, None, None] * _channel(p["weight"]) + _channel(p["bias"])

    x = torch.randn(4, C, 3, 5, generator=generator, dtype=torch.float64)
    _check_step(evo, reference, x, generator)
    assert evo.num_groups == groups


def test_evonorm_s0_matches_timm_in_float32():
    generator = torch.Generator().manual_seed(9)
    ours = build_norm({"name": "evonorm_s0", "group_size": 2}, C)
    _randomize(ours, generator)
    theirs = timm.layers.EvoNorm2dS0(C, group_size=2)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, C, 5, 5, generator=generator)
    torch.testing.assert_close(ours(x), theirs(x))


def test_rms_equals_rmsnorm_over_channels():
    generator = torch.Generator().manual_seed(10)
    eps = 1e-6
    rms = RMSNorm2d(C, eps).double()
    _randomize(rms, generator)

    def reference(x: Tensor, p: dict[str, Tensor]) -> Tensor:
        return x / torch.sqrt((x**2).mean(1, keepdim=True) + eps) * _channel(p["weight"])

    _check_step(rms, reference, torch.randn(3, C, 4, 2, generator=generator).double(), generator)


@pytest.mark.parametrize("name", ["frn", "evonorm_s0", "rms"])
def test_per_sample_norms_do_not_depend_on_the_other_samples(name):
    generator = torch.Generator().manual_seed(11)
    norm = build_norm(name, C).double()
    _randomize(norm, generator)
    batch = torch.randn(4, C, 3, 3, generator=generator, dtype=torch.float64)
    other = batch.clone()
    other[1:] = torch.randn(3, C, 3, 3, generator=generator, dtype=torch.float64) * 10
    torch.testing.assert_close(norm(batch)[0], norm(other)[0], rtol=0, atol=0)
    torch.testing.assert_close(norm(batch)[:1], norm(batch[:1]), rtol=1e-14, atol=1e-14)


# -- the registry, conversion, fusion, folding, synchronisation ------------------------------------


@pytest.mark.parametrize("name", sorted(NEW_NORMS))
def test_registered_with_nchw_and_five_dimensional_input(name):
    layer = build_norm(name, C)
    assert isinstance(layer, NEW_NORMS[name])
    assert norm_channels(layer) == C
    x = torch.randn(4, C, 5, 5)
    assert layer(x).shape == x.shape
    if name not in ("brn", "ghost_bn"):  # nn.BatchNorm2d subclasses: 4-D like bn
        assert layer(torch.randn(2, C, 3, 4, 5)).shape == (2, C, 3, 4, 5)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "brn", "r_max": 0.5}, "r_max must be a number >= 1, got 0.5"),
        ({"name": "brn", "d_max": -1.0}, "d_max must be a number >= 0"),
        ({"name": "brn", "warmup_steps": 1.5}, "warmup_steps must be an integer >= 0"),
        ({"name": "brn", "ramp_steps": -1}, "ramp_steps must be an integer >= 0"),
        ({"name": "ghost_bn", "virtual_batch_size": 0}, "virtual_batch_size must be an integer"),
        ({"name": "evonorm_b0", "momentum": 2.0}, "momentum must be null or a number in [0, 1]"),
        ({"name": "evonorm_s0", "num_groups": 4}, "evonorm_s0: 6 channels are not divisible"),
        ({"name": "frn", "eps": 0.0}, "frn: eps=0 divides by zero"),
        ({"name": "rms", "eps": 0.0}, "eps must be a number > 0"),
    ],
)
def test_bad_arguments_are_one_line_naming_the_key(spec, message):
    with pytest.raises(ConfigError) as error:
        build_norm(spec, C)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_frn_with_learned_eps_accepts_eps_zero():
    frn = build_norm({"name": "frn", "eps": 0.0, "learnable_eps": True}, C)
    assert torch.isfinite(frn(torch.zeros(1, C, 2, 2))).all()


@pytest.mark.parametrize(
    ("spec", "activation", "absorbed"),
    [
        ("frn", nn.ReLU(), True),
        ("frn", nn.LeakyReLU(0.2), True),
        ("frn", nn.SiLU(), False),
        ({"name": "frn", "tlu": False}, nn.ReLU(), False),
        ("evonorm_b0", nn.ReLU(), True),
        ("evonorm_s0", nn.SiLU(), True),
        ("brn", nn.ReLU(), False),
        ("rms", nn.ReLU(), False),
    ],
)
def test_norm_activation_layers_take_over_the_activation_after_them(spec, activation, absorbed):
    _, after = norm_and_activation(lambda c: build_norm(spec, c), C, activation)
    assert isinstance(after, nn.Identity) is absorbed
    assert after is activation or absorbed


def test_densenet_with_frn_stacks_no_relu_after_tlu():
    from normlab.models import densenet_bc_100

    model = densenet_bc_100(num_classes=10, norm="frn")
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    frns = [m for m in model.modules() if isinstance(m, FilterResponseNorm2d)]
    assert len(frns) == 99 and not relus


def _conv_bn_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, C, 3), nn.BatchNorm2d(C), nn.ReLU(), nn.Conv2d(C, C, 3), nn.BatchNorm2d(C)
    )


def test_convert_carries_statistics_and_affine_weights():
    generator = torch.Generator().manual_seed(12)
    model = _conv_bn_net()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            _randomize(module, generator)
            module.running_mean.uniform_(-1.0, 1.0, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
    x = torch.randn(2, 3, 8, 8, generator=generator)
    expected = model.eval()(x)
    for name in ("brn", "ghost_bn"):
        converted = convert_norms(copy.deepcopy(model), name)
        assert isinstance(converted[1], NEW_NORMS[name])
        torch.testing.assert_close(converted.eval()(x), expected, rtol=0, atol=0)
    converted = convert_norms(copy.deepcopy(model), "evonorm_b0")
    for index in (1, 4):
        assert isinstance(converted[index], EvoNormB0)
        for tensor in ("weight", "bias", "running_var"):
            assert torch.equal(getattr(converted[index], tensor), getattr(model[index], tensor))


@pytest.mark.parametrize("name", ["frn", "evonorm_b0", "evonorm_s0"])
def test_convert_to_a_norm_with_its_own_activation_warns_that_the_models_stay(name, caplog):
    with caplog.at_level(logging.WARNING, logger="normlab.norm.convert"):
        converted = convert_norms(_conv_bn_net(), name)
    assert isinstance(converted[2], nn.ReLU)  # in the model's forward: convert cannot take it
    (record,) = caplog.records
    assert re.match(
        rf"convert_norms: 2 \w+ layers apply their own activation.*norm={name} ", record.message
    )

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="normlab.norm.convert"):
        convert_norms(_conv_bn_net(), {"name": "frn", "tlu": False})  # no TLU: nothing doubles
        convert_norms(_conv_bn_net(), "gn")
    assert not caplog.records


def test_fold_norms_folds_brn_and_ghost_bn_and_says_why_not_the_others():
    generator = torch.Generator().manual_seed(13)
    x = torch.randn(2, 3, 8, 8, generator=generator)
    for name in NEW_NORMS:
        model = nn.Sequential(nn.Conv2d(3, C, 3), build_norm(name, C), nn.Conv2d(C, 2, 1))
        _randomize(model[1], generator)
        model.train()(torch.randn(4, 3, 8, 8, generator=generator))  # running statistics move
        folded, report = fold_norms(model, x)
        if name in ("brn", "ghost_bn"):
            assert [f.norm for f in report.folded] == ["1"] and not report.unfolded
            assert isinstance(folded[1], nn.Identity)
            torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-5, atol=1e-6)
        else:
            assert not report.folded
            (unfolded,) = report.unfolded
            assert unfolded.norm_type == type(model[1]).__name__
            assert "even at inference" in unfolded.reason or "not an affine map" in unfolded.reason


def test_sync_batchnorm_leaves_the_new_norms_alone_and_keeps_bn_family_ones():
    model = nn.Sequential(*(build_norm(name, C) for name in (*sorted(NEW_NORMS), "bn")))
    synced = NormSync().apply(model)
    kinds = [type(m).__name__ for m in synced]
    assert kinds[:-1] == [NEW_NORMS[name].__name__ for name in sorted(NEW_NORMS)]
    assert kinds[-1] == "SyncBatchNorm"


def test_sync_batchnorm_with_a_new_norm_says_what_it_syncs(caplog):
    from omegaconf import OmegaConf

    from normlab.validation import _say_what_sync_batchnorm_syncs

    cfg = OmegaConf.create(
        {
            "trainer": {"sync_batchnorm": True},
            "norm": {"name": "brn"},
            "model": {"norm": "${norm}", "head_norm": "frn", "fpn_norm": "bn"},
        }
    )
    with caplog.at_level(logging.INFO, logger="normlab"):
        _say_what_sync_batchnorm_syncs(cfg)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == (
        "trainer.sync_batchnorm=true syncs only BatchNorm-family layers (bn, syncbn, cuda_bn); "
        "it leaves norm=brn (per-process batch statistics), model.head_norm=frn (no batch "
        "statistics) as they are"
    )
    cfg.trainer.sync_batchnorm = False
    caplog.clear()
    _say_what_sync_batchnorm_syncs(cfg)
    assert not caplog.records


def test_running_average_factor_for_cumulative_momentum_is_one_over_steps():
    brn = BatchRenorm2d(C, momentum=None, warmup_steps=0, ramp_steps=0)
    inputs = [torch.randn(4, C, 2, 2) for _ in range(3)]
    for x in inputs:
        brn(x)
    all_means = torch.stack([x.mean((0, 2, 3)) for x in inputs]).mean(0)
    torch.testing.assert_close(brn.running_mean, all_means)
    assert math.isclose(float(brn.num_batches_tracked), 3)


# -- every model family trains with every new norm (slow: one fast_dev_run each) ------------------


@pytest.fixture(scope="module")
def generated_data(tmp_path_factory: pytest.TempPathFactory):
    """Tiny digit scenes and pairs, generated once for the module."""
    return tmp_path_factory.mktemp("data")


def _family_overrides(family: str, data_root) -> list[str]:
    quiet = ["logger=csv", "callbacks.model_summary=null", "callbacks.progress_bar=null"]
    if family in ("densenet_bc_100", "convnext_atto"):
        return [f"model={family}", "data.batch_size=8", *quiet]
    tiny = ["data.num_train=8", "data.num_val=4", "data.num_test=4", "data.batch_size=4"]
    if family == "retinanet":
        return ["experiment=retinanet_digits", f"data.root={data_root / 'scenes'}", *tiny, *quiet]
    return [
        "experiment=pix2pix_digits",
        f"data.root={data_root / 'pairs'}",
        "model.generator.ngf=8",
        "model.discriminator.ndf=8",
        *tiny,
        *quiet,
    ]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["retinanet", "pix2pix"])
@pytest.mark.parametrize("norm", sorted(NEW_NORMS))
def test_fast_dev_run_with_every_new_norm(compose_config, generated_data, family, norm):
    """DenseNet and ConvNeXt: tests/test_train.py::test_fast_dev_run_trains_every_norm."""
    from normlab.train import train

    overrides = _family_overrides(family, generated_data)
    metrics = train(compose_config("debug=fdr", f"norm={norm}", *overrides))
    assert all(math.isfinite(value) for value in metrics.values())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["densenet_bc_100", "convnext_atto", "retinanet", "pix2pix"])
def test_fast_dev_run_with_weight_standardization(compose_config, generated_data, family):
    from normlab.train import train

    overrides = _family_overrides(family, generated_data)
    cfg = compose_config("debug=fdr", "norm=gn", "norm.weight_standardization=true", *overrides)
    metrics = train(cfg)
    assert all(math.isfinite(value) for value in metrics.values())
