"""pix2pix networks: reference sizes, every registered norm, the bias rule, init, errors, config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.ops import FrozenBatchNorm2d

from normlab.errors import ConfigError
from normlab.models.pix2pix import (
    INIT_TYPES,
    PatchDiscriminator,
    PixelDiscriminator,
    UnetGenerator,
    check_image_size,
    init_weights,
    is_norm_layer,
)
from normlab.norm import NORMS, convert_norms, get_norm_layer
from normlab.utils.hydra_run import CONFIG_DIR

# Norms that carry their own shift (a bias parameter, or FrozenBN's bias buffer).
SHIFT_NORMS = ("bn", "syncbn", "cuda_bn", "ln", "gn", "in", "frozen_bn")


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def small_generator(norm: object = "bn", **kwargs: object) -> UnetGenerator:
    options = {"in_channels": 3, "out_channels": 2, "num_downs": 5, "ngf": 8, "norm": norm}
    return UnetGenerator(**{**options, **kwargs})  # type: ignore[arg-type]


def norm_weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([m.weight.detach().flatten() for m in model.modules() if is_norm_layer(m)])


def convs(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]


def bias_tied_convs(model: nn.Module) -> list[nn.Module]:
    """The convolutions whose bias the reference ties to the norm (all but the fixed-bias ones)."""
    if isinstance(model, UnetGenerator):
        fixed = [model.unet.up[1]]  # the output convT
    elif isinstance(model, PatchDiscriminator):
        fixed = [model.net[0], model.net[-1]]  # the first conv and the logit conv
    else:
        fixed = [model.net[0]]
    return [m for m in convs(model) if all(m is not f for f in fixed)]


def test_reference_parameter_counts() -> None:
    torch.manual_seed(0)
    assert num_params(UnetGenerator(3, 3, num_downs=8, ngf=64, norm="bn")) == 54_413_955
    assert num_params(UnetGenerator(3, 3, num_downs=7, ngf=64, norm="bn")) == 41_828_995
    assert num_params(PatchDiscriminator(6, ndf=64, n_layers=3, norm="bn")) == 2_768_705


def test_patch_discriminator_output_is_30x30_at_256() -> None:
    torch.manual_seed(0)
    model = PatchDiscriminator(6, ndf=64, n_layers=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 6, 256, 256)).shape == (1, 1, 30, 30)


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_every_registered_norm(norm: str) -> None:
    torch.manual_seed(0)
    generator = small_generator(norm).train()
    patch = PatchDiscriminator(5, ndf=8, n_layers=3, norm=norm).train()
    pixel = PixelDiscriminator(5, ndf=8, norm=norm).train()

    x = torch.randn(2, 3, 32, 32)
    fake = generator(x)
    assert fake.shape == (2, 2, 32, 32)
    pair = torch.cat([x, fake], 1)
    patch_out, pixel_out = patch(pair), pixel(pair)
    assert patch_out.shape == (2, 1, 2, 2)  # 32 → 16 → 8 → 4 → 3 → 2
    assert pixel_out.shape == (2, 1, 32, 32)
    (patch_out.square().mean() + pixel_out.square().mean()).backward()
    for model in (generator, patch, pixel):
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert torch.isfinite(fake).all() and torch.isfinite(patch_out).all()

    # Every norm position holds the requested kind, and nothing else counts as a norm:
    # the U-Net has 2 per level but none in the outermost and one in the innermost (2·5 - 3).
    norm_type = type(get_norm_layer(norm)(8))
    for model, expected in ((generator, 7), (patch, 3), (pixel, 1)):
        assert sum(type(m) is norm_type for m in model.modules()) == expected
        assert sum(is_norm_layer(m) for m in model.modules()) == expected
        if not issubclass(norm_type, _BatchNorm):  # bn, syncbn, brn, ghost_bn are BN subclasses
            assert not any(isinstance(m, _BatchNorm) for m in model.modules())


@pytest.mark.parametrize(
    "norm",
    [*SHIFT_NORMS, "none", {"name": "in", "affine": False}],
    ids=[*SHIFT_NORMS, "none", "in-no-affine"],
)
def test_conv_bias_only_without_a_norm_shift(norm: object) -> None:
    has_shift = norm in SHIFT_NORMS
    for model in (
        small_generator(norm),
        PatchDiscriminator(5, ndf=8, norm=norm),  # type: ignore[arg-type]
        PixelDiscriminator(5, ndf=8, norm=norm),  # type: ignore[arg-type]
    ):
        tied = bias_tied_convs(model)
        assert tied and all((m.bias is None) == has_shift for m in tied), (norm, type(model))
        fixed = [m for m in convs(model) if all(m is not t for t in tied)]
        assert fixed and all(m.bias is not None for m in fixed)


@pytest.mark.parametrize("norm", ["bn", "syncbn", "gn", "ln", "in"])
def test_norm_weights_get_the_pix2pix_init(norm: str) -> None:
    # The reference inits only classes named "*BatchNorm2d*"; every affine norm must get N(1, 0.02).
    torch.manual_seed(0)
    model = small_generator(norm, ngf=16)
    weights = norm_weights(model)
    assert weights.numel() == 464
    assert abs(weights.mean().item() - 1.0) < 0.005
    assert abs(weights.std().item() - 0.02) < 0.004
    for m in model.modules():
        if is_norm_layer(m):
            assert torch.all(m.bias == 0)

    conv_weights = torch.cat([m.weight.detach().flatten() for m in convs(model)])
    assert abs(conv_weights.mean().item()) < 1e-3
    assert abs(conv_weights.std().item() - 0.02) < 5e-4


def test_init_reaches_custom_and_converted_norms() -> None:
    class ScaleShift(nn.Module):
        """A norm that shares no base class with torch's."""

        def __init__(self, channels: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(channels))
            self.bias = nn.Parameter(torch.zeros(channels))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight[:, None, None] + self.bias[:, None, None]

    torch.manual_seed(0)
    model = PatchDiscriminator(6, ndf=16, norm=ScaleShift)
    weights = norm_weights(model)
    assert weights.numel() == 32 + 64 + 128 and abs(weights.std().item() - 0.02) < 0.005
    assert all(m.bias is None for m in bias_tied_convs(model))  # its bias parameter is a shift

    # Norms swapped in afterwards carry no mark, and are still recognised by class.
    converted = convert_norms(small_generator("bn", ngf=16), "gn")
    init_weights(converted)
    groups = [m for m in converted.modules() if isinstance(m, nn.GroupNorm)]
    assert len(groups) == 7
    assert abs(norm_weights(converted).std().item() - 0.02) < 0.004


def test_frozen_bn_buffers_untouched_and_init_types() -> None:
    model = PatchDiscriminator(6, ndf=8, norm="frozen_bn")
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(frozen) == 3 and all(torch.all(m.weight == 1) for m in frozen)

    torch.manual_seed(0)
    for init_type in INIT_TYPES:
        model = PixelDiscriminator(6, ndf=32, init_type=init_type, init_gain=0.5)  # type: ignore[arg-type]
        first = model.net[0]
        assert torch.isfinite(first.weight).all() and torch.all(first.bias == 0)
        if init_type == "normal":
            assert abs(first.weight.std().item() - 0.5) < 0.1
    # Orthogonal with gain 1: the 4×6 first conv has orthonormal rows.
    model = PixelDiscriminator(6, ndf=4, init_type="orthogonal", init_gain=1.0)
    w = model.net[0].weight.detach().flatten(1)
    torch.testing.assert_close(w @ w.T, torch.eye(4), atol=1e-5, rtol=0)


def test_bad_init_type_names_the_key_and_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"^init_type='uniform'.*orthogonal"):
        init_weights(nn.Conv2d(1, 1, 1), "uniform")
    with pytest.raises(ConfigError, match=r"^init_type='he'.*normal, xavier.*\(UnetGenerator\)"):
        small_generator(init_type="he")
    with pytest.raises(ConfigError, match=r"^init_type='he'.*\(PatchDiscriminator\)"):
        PatchDiscriminator(init_type="he", ndf=4)  # type: ignore[arg-type]


@pytest.mark.parametrize(("num_downs", "expected"), [(5, 0), (7, 2), (8, 3)])
def test_dropout_in_the_middle_decoder_levels(num_downs: int, expected: int) -> None:
    model = UnetGenerator(num_downs=num_downs, ngf=2)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == expected == num_downs - 5
    assert all(m.p == 0.5 for m in dropouts)
    no_dropout = UnetGenerator(num_downs=num_downs, ngf=2, use_dropout=False)
    assert not any(isinstance(m, nn.Dropout) for m in no_dropout.modules())


def test_tanh_output_and_activated_skip_connection() -> None:
    torch.manual_seed(0)
    model = small_generator("bn").eval()
    with torch.no_grad():
        out = model(50 * torch.randn(2, 3, 32, 32))
    assert isinstance(model.unet.up[-1], nn.Tanh)
    assert out.abs().max().item() <= 1.0 and out.abs().max().item() > 0.0

    # As in the reference (in-place LeakyReLU), a level's skip half is its activated input.
    block = model.unet.inner
    x = torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        y = block(x)
    assert y.shape == (2, 16, 16, 16)
    torch.testing.assert_close(y[:, :8], F.leaky_relu(x, 0.2), rtol=0, atol=0)


def test_image_size_and_num_downs_errors() -> None:
    check_image_size(256, 8)
    check_image_size((256, 128), 7)
    with pytest.raises(ConfigError) as error:
        check_image_size(100, 8)
    assert all(s in str(error.value) for s in ("100", "num_downs=8", "256"))
    with pytest.raises(ConfigError, match=r"\(256, 100\).*num_downs=7.*128"):
        check_image_size((256, 100), 7)
    with pytest.raises(ConfigError, match=r"at least 5.*got 4"):
        UnetGenerator(num_downs=4, ngf=2)
    with pytest.raises(ConfigError, match="num_downs"):
        check_image_size(256, 3)

    model = small_generator()
    with pytest.raises(ValueError, match=r"num_downs=5.*32.*48×32"):
        model(torch.randn(1, 3, 48, 32))


def test_config_node_builds_both_networks() -> None:
    node = OmegaConf.load(CONFIG_DIR / "model" / "pix2pix.yaml")
    # Channels come from the data module's config; D's (input + target) is set by the task.
    assert "in_channels" not in node.discriminator
    data = {"in_channels": 1, "out_channels": 3}
    cfg = OmegaConf.create({"norm": {"name": "gn", "num_groups": 2}, "model": node, "data": data})
    cfg.model.generator.update(num_downs=5, ngf=4)
    assert cfg.model.generator.in_channels == 1 and cfg.model.generator.out_channels == 3
    cfg.model.discriminator.update(in_channels=4, ndf=4)

    generator = instantiate(cfg.model.generator)
    assert isinstance(generator, UnetGenerator) and generator.num_downs == 5
    groups = [m for m in generator.modules() if isinstance(m, nn.GroupNorm)]
    assert len(groups) == 7 and all(m.num_groups == 2 for m in groups)
    assert isinstance(instantiate(cfg.model.discriminator), PatchDiscriminator)

    # The swap documented in the config file.
    cfg.model.discriminator._target_ = "normlab.models.pix2pix.PixelDiscriminator"
    del cfg.model.discriminator["n_layers"]
    assert isinstance(instantiate(cfg.model.discriminator), PixelDiscriminator)
