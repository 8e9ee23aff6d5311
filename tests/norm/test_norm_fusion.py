"""Norm + activation fusion: the hook's rules, and every model that offers its activations to a
norm computing exactly what it computes with plain BatchNorm (same state dict, same outputs)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

from normlab.models import (
    DenseNet,
    PatchDiscriminator,
    PixelDiscriminator,
    UnetGenerator,
    retinanet_resnet18_fpn,
    retinanet_resnet50_fpn,
)
from normlab.norm import NORMS, fuse_norm_activations, norm_and_activation, register_norm

FUSABLE = "fusable_bn_test"


class FusableBatchNorm(nn.BatchNorm2d):
    """BatchNorm that applies an absorbed ReLU or LeakyReLU itself, as a fused kernel would."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.activation: nn.Module | None = None

    def absorb_activation(self, activation: nn.Module) -> bool:
        if self.activation is not None or not isinstance(activation, (nn.ReLU, nn.LeakyReLU)):
            return False
        self.activation = activation
        return True

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        return y if self.activation is None else self.activation(y)


@pytest.fixture
def fusable() -> Iterator[str]:
    register_norm(FUSABLE, override=True)(FusableBatchNorm)
    yield FUSABLE
    NORMS.pop(FUSABLE)


def num_fused(model: nn.Module) -> int:
    return sum(
        isinstance(m, FusableBatchNorm) and m.activation is not None for m in model.modules()
    )


def num_identities(model: nn.Module) -> int:
    return sum(type(m) is nn.Identity for m in model.modules())


# --- the hook itself ---------------------------------------------------------------------------


def test_norm_and_activation_fuses_what_the_norm_accepts() -> None:
    relu = nn.ReLU(inplace=True)
    norm, after = norm_and_activation(FusableBatchNorm, 4, relu)
    assert type(after) is nn.Identity and norm.activation is relu

    silu = nn.SiLU()
    norm, after = norm_and_activation(FusableBatchNorm, 4, silu)  # refused: kept as it is
    assert after is silu and norm.activation is None

    plain, after = norm_and_activation(nn.BatchNorm2d, 4, relu)  # no absorb_activation
    assert type(plain) is nn.BatchNorm2d and after is relu


def test_fuse_norm_activations_only_rewrites_norm_then_activation() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        FusableBatchNorm(4),
        nn.ReLU(),  # fused
        nn.Conv2d(4, 4, 1),
        FusableBatchNorm(4),  # followed by a conv: untouched
        nn.Conv2d(4, 4, 1),
        FusableBatchNorm(4),
        nn.SiLU(),  # refused by the norm: stays
        nn.Sequential(FusableBatchNorm(4), nn.LeakyReLU(0.2)),  # nested: fused
        nn.BatchNorm2d(4),
        nn.ReLU(),  # plain norm: stays
    )
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        expected = model.eval()(x)

    assert fuse_norm_activations(model) == 2
    assert type(model[2]) is nn.Identity and isinstance(model[1].activation, nn.ReLU)
    assert model[4].activation is None
    assert isinstance(model[7], nn.SiLU) and model[6].activation is None
    assert type(model[8][1]) is nn.Identity and isinstance(model[8][0].activation, nn.LeakyReLU)
    assert isinstance(model[10], nn.ReLU)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert fuse_norm_activations(model) == 0  # nothing left to fuse


def test_fuse_norm_activations_pairs_true_neighbours_and_skips_custom_forwards() -> None:
    relu = nn.ReLU()  # one module at two places: each place is its own neighbour pair
    first, second = FusableBatchNorm(2), FusableBatchNorm(2)
    shared = nn.Sequential(first, relu, nn.Conv2d(2, 2, 1), second, relu)
    assert fuse_norm_activations(shared) == 2
    assert type(shared[1]) is nn.Identity and type(shared[4]) is nn.Identity

    class Reordered(nn.Sequential):
        def forward(self, x: Tensor) -> Tensor:  # the norm's output is not the ReLU's input
            return self[0](x) + self[1](x)

    assert fuse_norm_activations(Reordered(FusableBatchNorm(2), nn.ReLU())) == 0


# --- models: fused counts and parity with norm="bn" ----------------------------------------------


def assert_fused_equals_bn(
    build: Callable[[str], nn.Module],
    norm: str,
    expected_fused: int,
    make_input: Callable[[], Tensor],
    forward: Callable[[nn.Module, Tensor], Tensor] = lambda model, x: model(x),
) -> None:
    """``build(norm)`` fuses ``expected_fused`` activations, has ``build("bn")``'s state dict keys
    and, with its weights, the same outputs, gradients and running statistics in eval and train."""
    plain, fused = build("bn"), build(norm)
    assert num_fused(fused) == expected_fused
    assert num_identities(fused) - num_identities(plain) == expected_fused
    assert list(fused.state_dict()) == list(plain.state_dict())
    fused.load_state_dict(plain.state_dict(), strict=True)

    for training in (False, True):
        results = []
        for model in (plain, fused):
            model.train(training)
            model.zero_grad()
            x = make_input().requires_grad_()
            out = forward(model, x)
            out.square().sum().backward()
            grads = [p.grad for p in model.parameters() if p.requires_grad]
            results.append((out.detach(), x.grad, grads, [b.clone() for b in model.buffers()]))
        (out_p, dx_p, grads_p, bufs_p), (out_f, dx_f, grads_f, bufs_f) = results
        mode = "train" if training else "eval"
        torch.testing.assert_close(out_f, out_p, rtol=0, atol=0, msg=f"output ({mode})")
        torch.testing.assert_close(dx_f, dx_p, rtol=0, atol=0, msg=f"input grad ({mode})")
        assert len(grads_f) == len(grads_p)
        for g_f, g_p in zip(grads_f, grads_p, strict=True):
            torch.testing.assert_close(g_f, g_p, rtol=0, atol=0, msg=f"weight grad ({mode})")
        for b_f, b_p in zip(bufs_f, bufs_p, strict=True):
            torch.testing.assert_close(b_f, b_p, rtol=0, atol=0, msg=f"buffer ({mode})")


def _images(channels: int, size: int = 32) -> Callable[[], Tensor]:
    return lambda: torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))


def _seeded(build: Callable[[str], nn.Module]) -> Callable[[str], nn.Module]:
    def seeded(norm: str) -> nn.Module:
        torch.manual_seed(0)
        return build(norm)

    return seeded


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_densenet(fusable: str, memory_efficient: bool) -> None:
    def build(norm: str) -> nn.Module:
        return DenseNet(
            growth_rate=4,
            block_config=(2, 2),
            num_init_features=8,
            bn_size=2,
            num_classes=3,
            norm=norm,
            stem="imagenet",
            memory_efficient=memory_efficient,
        )

    # Stem 1, four dense layers × 2, one transition, norm5.
    assert_fused_equals_bn(_seeded(build), fusable, 11, _images(3))


def test_pix2pix_discriminators(fusable: str) -> None:
    patch = _seeded(lambda norm: PatchDiscriminator(6, ndf=8, n_layers=3, norm=norm))
    assert_fused_equals_bn(patch, fusable, 3, _images(6))
    pixel = _seeded(lambda norm: PixelDiscriminator(6, ndf=8, norm=norm))
    assert_fused_equals_bn(pixel, fusable, 1, _images(6))


def test_unet_down_norms_absorb_the_inner_blocks_leaky_relu(fusable: str) -> None:
    def build(norm: str) -> nn.Module:
        return UnetGenerator(3, 2, num_downs=5, ngf=8, norm=norm, use_dropout=False)

    # Each of the num_downs - 2 intermediate blocks' down norm absorbs its inner block's LeakyReLU.
    assert_fused_equals_bn(_seeded(build), fusable, 3, _images(3))
    fused = build(fusable)
    assert type(fused.unet.act) is nn.Identity  # the outermost block never activates its input
    assert isinstance(fused.unet.inner.act, nn.LeakyReLU)  # follows a conv without norm
    assert type(fused.unet.inner.inner.act) is nn.Identity


def _backbone_and_head(model: nn.Module, x: Tensor) -> Tensor:
    head = model.head(list(model.backbone(x).values()))
    return torch.cat([head["cls_logits"].flatten(), head["bbox_regression"].flatten()])


@pytest.mark.parametrize(
    ("builder", "backbone_fused"),
    # Stem 1, then one per basic block (8) or two per bottleneck (16 × 2).
    [(retinanet_resnet18_fpn, 9), (retinanet_resnet50_fpn, 33)],
)
def test_retinanet_backbone_and_head(
    fusable: str, builder: Callable[..., nn.Module], backbone_fused: int
) -> None:
    def build(norm: str) -> nn.Module:
        return builder(4, norm=norm, head_norm=norm, fpn_channels=32, min_size=64, max_size=64)

    head_fused = 8  # 4 conv-norm-ReLU per tower
    assert_fused_equals_bn(
        _seeded(build), fusable, backbone_fused + head_fused, _images(3, 64), _backbone_and_head
    )
    model = build(fusable)
    assert num_fused(model.backbone) == backbone_fused and num_fused(model.head) == head_fused
    assert isinstance(model.backbone.body.layer1[0].relu, nn.ReLU)  # after the residual add
