"""ConvNeXt: parity with timm's weights and logits, and every registry norm inside the blocks."""

from __future__ import annotations

import warnings

import pytest
import timm
import timm.layers
import torch
from torch import nn

from normlab.models.convnext import (
    ConvNeXt,
    convnext_atto,
    convnext_base,
    convnext_femto,
    convnext_nano,
    convnext_pico,
    convnext_small,
    convnext_tiny,
)
from normlab.norm import NORMS, LayerNorm2d

# Parameter counts of timm's models with 1000 classes (also asserted against timm itself).
SIZES = {
    "convnext_atto": (convnext_atto, 3_695_520),
    "convnext_femto": (convnext_femto, 5_217_784),
    "convnext_pico": (convnext_pico, 9_045_672),
    "convnext_nano": (convnext_nano, 15_593_560),
    "convnext_tiny": (convnext_tiny, 28_589_128),
    "convnext_small": (convnext_small, 50_223_688),
    "convnext_base": (convnext_base, 88_591_464),
}
LAYER_NORMS = (LayerNorm2d, timm.layers.LayerNorm2d, timm.layers.LayerNorm, nn.LayerNorm)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(SIZES))
@torch.no_grad()
def test_matches_timm(name: str) -> None:
    factory, expected_params = SIZES[name]
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False).eval()
    # Built on the meta device: its own random init would be overwritten anyway, and skipping it
    # halves the time of this test. `assign=True` then adopts timm's tensors.
    with torch.device("meta"):
        ours = factory(norm="ln").eval()

    assert list(ours.state_dict()) == list(reference.state_dict())
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)
    assert not any(p.is_meta for p in [*ours.parameters(), *ours.buffers()])
    assert num_params(ours) == num_params(reference) == expected_params

    x = torch.randn(1, 3, 64, 64)
    assert (ours(x) - reference(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_every_registry_norm_trains(norm: str) -> None:
    torch.manual_seed(0)
    # patch_size=2 leaves a 2x2 map in the last stage on 32 px, so instance norm can train there.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "in" head fallback warning has its own test
        model = convnext_atto(num_classes=10, in_channels=1, patch_size=2, norm=norm).train()

    out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 10)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)

    if norm != "ln":
        # The registry, not a hard-coded LayerNorm, built every norm outside the head.
        body = [m for name, m in model.named_modules() if not name.startswith("head")]
        assert not any(isinstance(m, LAYER_NORMS) for m in body)
        # The head follows `norm`, except that instance norm falls back to layer norm there.
        assert isinstance(model.head.norm, LayerNorm2d) == (norm == "in")


@pytest.mark.parametrize("norm", [*sorted(NORMS), {"name": "gn", "num_groups": 4}], ids=str)
def test_linear_mlp_blocks_take_any_norm(norm: object) -> None:
    # tiny and larger run the MLP channels-last (conv_mlp=False); the norm still sees NxCxHxW.
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ConvNeXt((1, 1, 1, 1), (8, 16, 32, 64), num_classes=5, norm=norm, patch_size=2)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5)
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_init_follows_timm() -> None:
    torch.manual_seed(0)
    model = convnext_atto(num_classes=10)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert all(m.bias is None or not m.bias.any() for m in layers)
    weights = torch.cat([m.weight.flatten() for m in layers])
    assert weights.std().item() == pytest.approx(0.02, rel=0.05)


def test_drop_path_and_layer_scale() -> None:
    model = convnext_atto(num_classes=10, drop_path_rate=0.2, ls_init_value=0.5)
    blocks = [block for stage in model.stages for block in stage.blocks]
    drop_paths = [b.drop_path for b in blocks[1:]]
    assert isinstance(blocks[0].drop_path, nn.Identity)  # the first block's rate is 0
    assert all(isinstance(d, timm.layers.DropPath) for d in drop_paths)
    rates = [d.drop_prob for d in drop_paths]
    assert rates == sorted(rates) and len(set(rates)) == len(rates)
    assert rates[-1] == pytest.approx(0.2)
    assert all(torch.equal(b.gamma, torch.full_like(b.gamma, 0.5)) for b in blocks)

    no_scale = convnext_atto(num_classes=10, ls_init_value=None)
    assert all(b.gamma is None for stage in no_scale.stages for b in stage.blocks)
    assert not any("gamma" in name for name, _ in no_scale.named_parameters())


def test_instance_norm_head_falls_back_to_layer_norm() -> None:
    with pytest.warns(UserWarning, match="instance norm"):
        model = convnext_atto(num_classes=10, norm="in")
    assert isinstance(model.head.norm, LayerNorm2d)
    assert isinstance(model.stem[1], nn.InstanceNorm2d)

    # An explicit head norm is used as given, without a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explicit = ConvNeXt((1, 1, 1, 1), (8, 16, 32, 64), num_classes=3, norm="in", head_norm="bn")
    assert isinstance(explicit.head.norm, nn.BatchNorm2d)
