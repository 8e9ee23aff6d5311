"""The fast forward/backward of every small-batch norm (``normlab.ops.norm_functions``, brn on
ATen's BatchNorm) and of ``in`` (ATen's BatchNorm per sample on channels-last input) against the
plain autograd formulas they replace, in float32: outputs, input gradients, parameter gradients
and running statistics, in both memory formats.
(``test_small_batch_norms.py`` checks the same layers against their papers in float64.)"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from normlab.norm import build_norm
from normlab.ops import cpu_kernels, norm_functions
from normlab.ops.bn_stats import (
    count_training_step,
    step_momentum,
    unbiased_variance,
    update_running_average,
    update_running_stats,
)

C = 16
FORMATS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}


def _channel(t: Tensor, ndim: int = 4) -> Tensor:
    return t.view(1, -1, *([1] * (ndim - 2)))


# -- the plain formulas: autograd through every intermediate (the layers' earlier forwards) ------


def plain_bn_eval(m: nn.Module, x: Tensor) -> Tensor:
    x_hat = (x - _channel(m.running_mean)) / torch.sqrt(_channel(m.running_var) + m.eps)
    return x_hat * _channel(m.weight) + _channel(m.bias)


def plain_brn(m: nn.Module, x: Tensor) -> Tensor:
    if not m.training:
        return plain_bn_eval(m, x)
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x, dims, correction=0)
    std = torch.sqrt(var + m.eps)
    with torch.no_grad():
        r_max, d_max = m.current_limits()
        running_std = torch.sqrt(m.running_var + m.eps)
        r = (std / running_std).clamp(1.0 / r_max, r_max)
        d = ((mean - m.running_mean) / running_std).clamp(-d_max, d_max)
        unbiased = unbiased_variance(var, x.numel() // x.shape[1])
        update_running_stats(m.running_mean, m.running_var, mean, unbiased, step_momentum(m))
    x_hat = (x - _channel(mean)) / _channel(std) * _channel(r) + _channel(d)
    return x_hat * _channel(m.weight) + _channel(m.bias)


def plain_ghost_bn(m: nn.Module, x: Tensor) -> Tensor:
    if not m.training:
        return plain_bn_eval(m, x)
    dims = [0, *range(2, x.dim())]
    outputs, means, variances, counts = [], [], [], []
    for chunk in x.split(list(m._chunk_sizes(x))):
        var, mean = torch.var_mean(chunk, dims, correction=0)
        normalised = (chunk - _channel(mean)) / torch.sqrt(_channel(var) + m.eps)
        outputs.append(normalised * _channel(m.weight) + _channel(m.bias))
        means.append(mean.detach())
        variances.append(var.detach())
        counts.append(chunk.numel() // chunk.shape[1])
    total = sum(counts)
    mean = sum(n * v for n, v in zip(counts, means, strict=True)) / total
    pooled = sum(n * v for n, v in zip(counts, variances, strict=True)) / (total - len(counts))
    update_running_stats(m.running_mean, m.running_var, mean, pooled, step_momentum(m))
    return torch.cat(outputs)


def plain_frn(m: nn.Module, x: Tensor) -> Tensor:
    nu2 = x.square().mean(dim=tuple(range(2, x.dim())), keepdim=True)
    eps = abs(m.eps) if m.learned_eps is None else abs(m.eps) + m.learned_eps.abs()
    y = x / torch.sqrt(nu2 + eps) * _channel(m.weight) + _channel(m.bias)
    return y if m.tau is None else torch.maximum(y, _channel(m.tau))


def plain_evonorm_b0(m: nn.Module, x: Tensor) -> Tensor:
    spatial = tuple(range(2, x.dim()))
    if m.training:
        batch_var = x.var(dim=(0, *spatial), correction=0)
        update_running_average(
            m.running_var,
            unbiased_variance(batch_var.detach(), x.numel() // x.shape[1]),
            count_training_step(m.num_batches_tracked, m.momentum),
        )
    else:
        batch_var = m.running_var
    instance_std = torch.sqrt(x.var(dim=spatial, correction=0, keepdim=True) + m.eps)
    batch_std = _channel(torch.sqrt(batch_var + m.eps))
    denominator = torch.maximum(batch_std, x * _channel(m.v) + instance_std)
    return x / denominator * _channel(m.weight) + _channel(m.bias)


def plain_evonorm_s0(m: nn.Module, x: Tensor) -> Tensor:
    grouped = x.reshape(x.shape[0], m.num_groups, -1)
    var = grouped.var(dim=-1, correction=0, keepdim=True)
    gated = (x * torch.sigmoid(x * _channel(m.v))).reshape(grouped.shape)
    normalised = (gated / torch.sqrt(var + m.eps)).view_as(x)
    return normalised * _channel(m.weight) + _channel(m.bias)


def plain_rms(m: nn.Module, x: Tensor) -> Tensor:
    y = x * torch.rsqrt(x.square().mean(1, keepdim=True) + m.eps)
    return y if m.weight is None else y * _channel(m.weight)


def plain_in(m: nn.Module, x: Tensor) -> Tensor:
    var, mean = torch.var_mean(x, dim=(2, 3), correction=0, keepdim=True)
    y = (x - mean) / torch.sqrt(var + m.eps)
    return y if m.weight is None else y * _channel(m.weight) + _channel(m.bias)


PLAIN: dict[str, Callable[[nn.Module, Tensor], Tensor]] = {
    "in": plain_in,
    "brn": plain_brn,
    "ghost_bn": plain_ghost_bn,
    "frn": plain_frn,
    "evonorm_b0": plain_evonorm_b0,
    "evonorm_s0": plain_evonorm_s0,
    "rms": plain_rms,
}
# Specs that reach every branch: brn past its warm-up (r and d clip), ghost_bn with a
# remainder chunk, FRN with a learned epsilon and TLU, S0 with groups, RMS and IN without affine.
SPECS = [
    {"name": "brn", "r_max": 1.5, "d_max": 0.5, "warmup_steps": 1, "ramp_steps": 1},
    {"name": "ghost_bn", "virtual_batch_size": 3},
    {"name": "ghost_bn", "virtual_batch_size": 2},
    {"name": "frn", "learnable_eps": True},
    {"name": "frn", "tlu": False},
    {"name": "evonorm_b0"},
    {"name": "evonorm_s0", "num_groups": 4},
    {"name": "rms"},
    {"name": "rms", "affine": False},
    {"name": "in"},
    {"name": "in", "affine": False},
]


def _randomize(module: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
        if hasattr(module, "tau") and module.tau is not None:
            module.tau.normal_(generator=generator)  # TLU's threshold cuts inside the data


def _step(layer: nn.Module, forward: Callable[[Tensor], Tensor], x: Tensor, upstream: Tensor):
    leaf = x.detach().requires_grad_(True)
    layer.zero_grad()
    y = forward(leaf)
    y.backward(upstream)
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    return y.detach(), leaf.grad, grads, {n: b.clone() for n, b in layer.named_buffers()}


CHUNKS = {"whole batch": 7, "one sample each": 1, "three samples each": 3}
# EvoNorm's and FRN's float32 CPU passes run in fused C loops (cpu_kernels); their ATen path, by
# chunks, is what compiled, half-precision or GPU calls (and machines without a C compiler) take.
FUSED = "fused C kernels"
FUSED_KERNELS = {
    "evonorm_s0": {"evonorm_s0_forward", "evonorm_s0_backward"},
    "evonorm_b0": {
        "instance_statistics", "evonorm_b0_forward", "evonorm_b0_backward_sums",
        "evonorm_b0_backward_input",
    },
    "frn": {"frn_forward", "frn_backward"},
}  # fmt: skip
PATHS = [
    (spec, path)
    for spec in SPECS
    for path in ([FUSED, *CHUNKS] if spec["name"] in FUSED_KERNELS else CHUNKS)
]


@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize(
    "spec, path", PATHS, ids=lambda v: "-".join(map(str, v.values())) if isinstance(v, dict) else v
)
def test_fast_path_equals_plain_formula_in_float32(spec, path, layout, monkeypatch):
    kernels: list[str] = []
    if path == FUSED:
        assert cpu_kernels.library() is not None, "the fused EvoNorm kernels did not build"
        run = cpu_kernels._run

        def counted(name: str, *args, **kwargs) -> bool:
            kernels.append(name)
            return run(name, *args, **kwargs)

        monkeypatch.setattr(cpu_kernels, "_run", counted)
    else:
        monkeypatch.setattr(cpu_kernels, "applies", lambda *_: False)
        # Eager passes run by chunks of samples, as on real activations: 7 samples as 7, or 3,
        # 3, 1.
        monkeypatch.setattr(norm_functions, "_CHUNK_BYTES", CHUNKS[path] * C * 5 * 6 * 4)
    generator = torch.Generator().manual_seed(0)
    fast = build_norm(spec, C)
    _randomize(fast, generator)
    plain = copy.deepcopy(fast)
    for step, training in enumerate([True, True, True, False]):
        fast.train(training)
        plain.train(training)
        # Offsets and scales per channel, so that BN-family statistics differ from their inits
        # and brn's r and d clip.
        x = torch.randn(7, C, 5, 6, generator=generator) * (1 + step) + step
        x = x.contiguous(memory_format=FORMATS[layout])
        upstream = torch.randn(x.shape, generator=generator)
        got = _step(fast, fast, x, upstream)
        expected = _step(plain, lambda t: PLAIN[spec["name"]](plain, t), x, upstream)
        for part, a, b in zip(["output", "input grad"], got[:2], expected[:2], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{part} at step {step}")
        for kind in (2, 3):  # parameter gradients, then buffers
            assert got[kind].keys() == expected[kind].keys()
            for name in got[kind]:
                torch.testing.assert_close(
                    got[kind][name], expected[kind][name], rtol=1e-4, atol=1e-5,
                    msg=f"{name} at step {step}",
                )  # fmt: skip
        assert got[0].is_contiguous(memory_format=FORMATS[layout])
    if path == FUSED:  # every pass of the 4 steps ran in C
        assert set(kernels) == FUSED_KERNELS[spec["name"]]
        assert len(kernels) == 4 * len(FUSED_KERNELS[spec["name"]])


def test_fast_paths_save_no_more_than_bn_for_backward():
    """Each fast path keeps its input and per-row statistics, as BatchNorm does, not the 2-5
    activation-sized intermediates of the plain formulas."""
    x = torch.randn(4, C, 8, 8)

    def saved(layer: nn.Module) -> int:
        storages: dict[int, int] = {}

        def pack(t: Tensor) -> Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x.detach().requires_grad_(True))
        return sum(storages.values())

    bn = saved(build_norm("bn", C).train())
    for spec in SPECS:
        assert saved(build_norm(spec, C).train()) <= 1.25 * bn, spec


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(map(str, s.values())))
def test_fast_path_output_takes_an_in_place_op(spec):
    """A following ReLU(inplace=True) works on the output: it is not a view autograd forbids."""
    layer = build_norm(spec, C).train()
    leaf = torch.randn(4, C, 5, 6, requires_grad=True)
    layer(leaf).relu_().sum().backward()
    assert leaf.grad is not None
