"""Every registered norm under CPU bfloat16 autocast (``trainer.precision=bf16-mixed``): a
training step on bfloat16 input, as a bf16 convolution hands it over, keeps the running
buffers in float32 and computes the statistics in float32, so they equal those of a float32
step on the same (bf16-representable) values; the output and the parameter gradients are the
float32 ones up to bfloat16 rounding, and the input gradient is bfloat16, as the input. The same
holds in either memory format, with Batch Renorm's corrections in force, for cuda_bn's Triton
kernels (in Triton's interpreter here), and in eval mode after the step."""

from __future__ import annotations

import copy

import pytest
import torch

from normlab.norm import NORMS, build_norm

SPECS = {
    "ghost_bn": {"name": "ghost_bn", "virtual_batch_size": 3},
    # Past its warm-up: the corrections r and d, computed from the batch statistics, are in force.
    "brn": {"name": "brn", "warmup_steps": 0, "ramp_steps": 0},
    # The kernels, not the native BN that backend=auto runs on CPU tensors.
    "cuda_bn[triton]": {"name": "cuda_bn", "backend": "triton"},
}
# bfloat16 keeps 8 significant bits: one rounding of the output is ≤ 2^-9 relative, and every
# norm here is within 2^-7 (measured ≤ 3.8e-3 = 2^-8.0, evonorm_b0).
OUTPUT_TOLERANCE = 2**-7
# The input gradient is computed from bf16-rounded terms and rounded to bf16 again: measured
# ≤ 6.3e-3 relative (bn, channels_last).
INPUT_GRADIENT_TOLERANCE = 2**-5
# The parameter gradients are sums over all 3360 positions of each channel. Summed in float32
# they are exact up to the rounding of their bf16 terms (measured ≤ 3.0e-3: ATen's bn, when the
# upstream gradient's memory format is not the output's); summed in bfloat16, as ATen's CPU
# LayerNorm backward sums them for bf16 input, they are off by percents (1.2 % of the largest at
# 210 positions, 4.8 % at 5000: normlab's ln normalises such input in float32).
PARAMETER_GRADIENT_TOLERANCE = 2**-7
# Enough positions per channel for a bf16 sum to show; cuda_bn's kernels run in Triton's
# interpreter, at a size that takes it seconds rather than half a minute.
SHAPE = (7, 8, 20, 24)
SHAPES = {"cuda_bn[triton]": (7, 8, 5, 6)}
MEMORY_FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    """Equal up to ``tolerance`` relative to each value, or to the largest value (where a value
    is near zero, its bf16 rounding error is that of the terms it was computed from)."""
    scale = float(expected.detach().abs().max())
    torch.testing.assert_close(
        actual.detach().float(), expected.detach(), rtol=tolerance, atol=tolerance * scale
    )


@pytest.mark.parametrize(
    ("name", "memory_format"),
    [
        *((name, memory_format) for name in sorted(NORMS) for memory_format in MEMORY_FORMATS),
        # The kernels' two layouts are checked in tests/ops/test_cuda_bn.py; one suffices here.
        ("cuda_bn[triton]", "channels_last"),
    ],
)
def test_bf16_autocast_step_keeps_float32_statistics_and_buffers(name, memory_format):
    generator = torch.Generator().manual_seed(0)
    layer = build_norm(SPECS.get(name, name), 8).train()
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
        # Running statistics near the batch's, so that Batch Renorm's r and d are not clipped
        # and eval mode normalises to values of order one.
        if getattr(layer, "running_mean", None) is not None:
            layer.running_mean.copy_(20 + torch.randn(8, generator=generator))
        if getattr(layer, "running_var", None) is not None:
            layer.running_var.copy_(9 * (torch.rand(8, generator=generator) + 0.5))
    reference = copy.deepcopy(layer)
    # Far from zero mean, so that statistics accumulated in bfloat16 would be visibly off.
    x = (torch.randn(*SHAPES.get(name, SHAPE), generator=generator) * 3 + 20).bfloat16()
    x = x.contiguous(memory_format=MEMORY_FORMATS[memory_format])
    upstream = torch.randn(x.shape, generator=generator).bfloat16()
    x.requires_grad_(True)
    x_float = x.detach().float().requires_grad_(True)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.backward(upstream.to(y.dtype))
    expected = reference(x_float)
    expected.backward(upstream.float())

    for buffer_name, buffer in layer.named_buffers():
        if buffer.is_floating_point():
            assert buffer.dtype == torch.float32, buffer_name
    torch.testing.assert_close(
        dict(layer.named_buffers()), dict(reference.named_buffers()), rtol=1e-6, atol=1e-6
    )
    _close(y, expected, OUTPUT_TOLERANCE)
    assert x.grad.dtype == torch.bfloat16
    _close(x.grad, x_float.grad, INPUT_GRADIENT_TOLERANCE)
    for (param_name, parameter), ref in zip(
        layer.named_parameters(), reference.parameters(), strict=True
    ):
        assert parameter.grad.dtype == torch.float32, param_name
        _close(parameter.grad, ref.grad, PARAMETER_GRADIENT_TOLERANCE)

    # Eval mode after the step: the float32 running statistics normalise the bf16 input.
    layer.eval(), reference.eval()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        _close(y, reference(x_float), OUTPUT_TOLERANCE)
