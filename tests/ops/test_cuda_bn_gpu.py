"""cuda_bn's kernels compiled for a GPU (`make test-gpu`), at realistic shapes, against
nn.BatchNorm2d in float64 on the same device. Deselected unless `-m gpu` is given.

Tolerances: compiled, ``1 / tl.sqrt`` and ``tl.exp`` become the GPU's approximate instructions,
so results differ from the interpreter's (and from float64) by about 1e-7 relative. Every
comparison here allows that: fp32 uses assert_close's defaults (rtol 1.3e-6, atol 1e-5), bf16
its bf16 defaults (rtol 1.6e-2), the γ/β gradients — sums over N·H·W values — rtol 1e-4.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.ops.batchnorm import CudaBatchNorm, kernels

pytestmark = pytest.mark.gpu

SHAPES = [(32, 64, 56, 56), (32, 256, 28, 28), (64, 1024, 7, 7), (8, 3, 224, 224)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(scope="module", autouse=True)
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.fail("`make test-gpu` needs a CUDA device (these tests are the GPU half of cuda_bn)")
    if kernels.INTERPRETED:
        pytest.fail("TRITON_INTERPRET=1 is set: the GPU tests must compile the kernels")
    return torch.device("cuda")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_matches_batchnorm_at_realistic_shapes(shape, channels_last, dtype):
    device = torch.device("cuda")
    generator = torch.Generator(device).manual_seed(0)
    channels = shape[1]
    truth = nn.BatchNorm2d(channels).to(device, torch.double)
    with torch.no_grad():
        truth.weight.uniform_(0.5, 1.5, generator=generator)
        truth.bias.normal_(generator=generator)
    ours = CudaBatchNorm(channels, backend="triton", activation="relu").to(device)
    ours.load_state_dict(truth.state_dict())
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for mode in ("train", "train", "eval"):
        ours.train(mode == "train")
        truth.train(mode == "train")
        x = torch.randn(shape, device=device, generator=generator) * 2 + 0.5
        x = x.to(dtype).contiguous(memory_format=memory_format)
        dy = torch.randn(shape, device=device, generator=generator).to(dtype)
        x_ours, x_truth = x.clone().requires_grad_(True), x.double().requires_grad_(True)
        y_ours, y_truth = ours(x_ours), F.relu(truth(x_truth))
        assert y_ours.dtype == dtype
        assert y_ours.is_contiguous(memory_format=memory_format)
        y_ours.backward(dy)
        y_truth.backward(dy.double())
        torch.testing.assert_close(y_ours, y_truth.to(dtype))
        torch.testing.assert_close(x_ours.grad, x_truth.grad.to(dtype))
        for name in ("weight", "bias"):
            got, want = getattr(ours, name).grad, getattr(truth, name).grad
            torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-3)
            getattr(ours, name).grad = getattr(truth, name).grad = None
        torch.testing.assert_close(ours.running_mean, truth.running_mean.float())
        torch.testing.assert_close(ours.running_var, truth.running_var.float())


def test_torch_compile_with_inductor_matches_eager():
    device = torch.device("cuda")

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 16, 3), CudaBatchNorm(16, backend="triton", activation="silu")
        ).to(device)

    eager, compiled = model(), model()
    step = torch.compile(compiled)
    x = torch.randn(8, 3, 32, 32, device=device)
    torch.testing.assert_close(step(x), eager(x))
    step(x).sum().backward()
    eager(x).sum().backward()
    torch.testing.assert_close(compiled[0].weight.grad, eager[0].weight.grad)
    torch.testing.assert_close(compiled[1].running_var, eager[1].running_var)
