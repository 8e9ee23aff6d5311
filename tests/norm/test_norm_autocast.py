"""Every registered norm under CPU bfloat16 autocast (``trainer.precision=bf16-mixed``): a
training step on bfloat16 input, as a bf16 convolution hands it over, keeps the running
buffers in float32 and computes the statistics in float32, so they equal those of a float32
step on the same (bf16-representable) values; the output and the parameter gradients are the
float32 ones up to bfloat16 rounding, and the input gradient is bfloat16, as the input."""

from __future__ import annotations

import copy

import pytest
import torch

from normlab.norm import NORMS, build_norm

SPECS = {"ghost_bn": {"name": "ghost_bn", "virtual_batch_size": 3}}
# bfloat16 keeps 8 significant bits: one rounding of the output is ≤ 2^-9 relative, and every
# norm here is within 2^-7 (measured ≤ 3.1e-3 = 2^-8.3 on this input).
OUTPUT_TOLERANCE = 2**-7
# The parameter gradients sum bf16-rounded terms in float32: measured ≤ 6e-3 relative.
GRADIENT_TOLERANCE = 2**-5


@pytest.mark.parametrize("name", sorted(NORMS))
def test_bf16_autocast_step_keeps_float32_statistics_and_buffers(name):
    generator = torch.Generator().manual_seed(0)
    layer = build_norm(SPECS.get(name, name), 8).train()
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
    reference = copy.deepcopy(layer)
    # Far from zero mean, so that statistics accumulated in bfloat16 would be visibly off.
    x = (torch.randn(7, 8, 5, 6, generator=generator) * 3 + 20).bfloat16()
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
    torch.testing.assert_close(
        y.float(),
        expected,
        rtol=OUTPUT_TOLERANCE,
        atol=OUTPUT_TOLERANCE * float(expected.abs().max()),
    )
    assert x.grad.dtype == torch.bfloat16
    scale = float(x_float.grad.abs().max())
    torch.testing.assert_close(
        x.grad.float(), x_float.grad, rtol=GRADIENT_TOLERANCE, atol=GRADIENT_TOLERANCE * scale
    )
    for (param_name, parameter), ref in zip(
        layer.named_parameters(), reference.parameters(), strict=True
    ):
        assert parameter.grad.dtype == torch.float32, param_name
        scale = float(ref.grad.abs().max())
        torch.testing.assert_close(
            parameter.grad, ref.grad, rtol=GRADIENT_TOLERANCE, atol=GRADIENT_TOLERANCE * scale
        )
