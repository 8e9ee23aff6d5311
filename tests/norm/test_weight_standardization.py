"""``norm.weight_standardization=true``: the weight of every convolution feeding a norm is
standardised per output channel, in every model family, in convert_norms, fold_norms and export."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from normlab.errors import ConfigError
from normlab.export import fold_norms
from normlab.norm import bake_standardized_weights, build_norm, convert_norms
from normlab.norm.standardize import EPS, StandardizedWeight, is_standardized

WS_GN = {"name": "gn", "weight_standardization": True}


def _standardized_reference(weight: Tensor, out_axis: int, groups: int = 1) -> Tensor:
    """Each output channel's weights (all input channels and taps) to mean 0, variance 1."""
    w = weight.double()
    if out_axis == 1:  # transposed: in × out/groups × k; output channel (g, j) = rows of g, col j
        in_per_group = w.shape[0] // groups
        blocks = []
        for g in range(groups):
            block = w[g * in_per_group : (g + 1) * in_per_group].transpose(0, 1)
            blocks.append(block)
        per_out = torch.cat(blocks).flatten(1)  # (groups · out/groups) × (in/groups · k)
    else:
        per_out = w.flatten(1)
    mean = per_out.mean(1, keepdim=True)
    var = per_out.var(1, unbiased=False, keepdim=True)
    standardized = (per_out - mean) / torch.sqrt(var + EPS)
    if out_axis == 0:
        return standardized.view_as(w)
    out_per_group = w.shape[1]
    pieces = standardized.view(groups, out_per_group, in_per_group, *w.shape[2:])
    return pieces.transpose(1, 2).reshape(w.shape)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 6, 3),
        nn.Conv2d(4, 6, 3, groups=2),
        nn.ConvTranspose2d(4, 6, 4, stride=2),
        nn.ConvTranspose2d(4, 6, 3, groups=2),
    ],
    ids=["conv", "grouped", "transposed", "grouped_transposed"],
)
def test_standardized_weight_has_zero_mean_unit_variance_per_output_channel(conv):
    conv = conv.double()
    transposed = isinstance(conv, nn.ConvTranspose2d)
    standardized = StandardizedWeight(transposed, conv.groups)(conv.weight)
    expected = _standardized_reference(conv.weight, 1 if transposed else 0, conv.groups)
    torch.testing.assert_close(standardized, expected, rtol=1e-12, atol=1e-12)


def test_a_conv_before_a_marked_norm_computes_with_its_standardized_weight():
    torch.manual_seed(0)
    model = convert_norms(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()), WS_GN)
    conv = model[0]
    assert is_standardized(conv)
    raw = conv.parametrizations.weight.original
    x = torch.randn(2, 3, 6, 6)
    expected = nn.functional.conv2d(x, _standardized_reference(raw, 0).float(), conv.bias)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
    # The raw weight is what trains; a gradient reaches it through the standardization.
    model(x).sum().backward()
    assert raw.grad is not None and raw.grad.abs().sum() > 0


def test_without_the_switch_nothing_is_standardized():
    from normlab.models import densenet_bc_100

    model = densenet_bc_100(num_classes=10, norm="gn")
    assert not any(is_standardized(m) for m in model.modules())


def test_the_switch_must_be_a_boolean():
    with pytest.raises(ConfigError, match=r"norm\.weight_standardization must be true or false"):
        build_norm({"name": "gn", "weight_standardization": "yes"}, 8)


def _families() -> dict[str, Callable[[dict], tuple[nn.Module, tuple]]]:
    from normlab.models import convnext_atto, densenet_bc_100, retinanet_resnet18_fpn
    from normlab.models.pix2pix import PatchDiscriminator, PixelDiscriminator, UnetGenerator

    image = torch.randn(2, 3, 32, 32)
    return {
        "densenet_bc_100": lambda n: (densenet_bc_100(num_classes=10, norm=n), (image,)),
        "convnext_atto": lambda n: (convnext_atto(num_classes=10, norm=n), (image,)),
        "retinanet_backbone": lambda n: (
            retinanet_resnet18_fpn(num_classes=3, norm=n).backbone,
            (image,),
        ),
        "unet": lambda n: (UnetGenerator(3, 3, num_downs=5, ngf=8, norm=n), (image,)),
        "patch_d": lambda n: (PatchDiscriminator(6, 8, norm=n), (torch.randn(2, 6, 32, 32),)),
        "pixel_d": lambda n: (PixelDiscriminator(6, 8, norm=n), (torch.randn(2, 6, 32, 32),)),
    }


# Convolutions directly before a norm: DenseNet-BC-100: each bottleneck's conv1; ConvNeXt-atto:
# the stem and 12 depthwise convs; ResNet-18: all 20; U-Net (5 levels): 3 down and 4 up;
# PatchGAN: the 3 inner convs; PixelGAN: the middle conv.
EXPECTED_STANDARDIZED = {
    "densenet_bc_100": 48,
    "convnext_atto": 13,
    "retinanet_backbone": 20,
    "unet": 7,
    "patch_d": 3,
    "pixel_d": 1,
}


@pytest.mark.parametrize(
    "family",
    [
        pytest.param(f, marks=pytest.mark.slow) if f == "retinanet_backbone" else f  # 3 s to build
        for f in sorted(EXPECTED_STANDARDIZED)
    ],
)
def test_every_conv_feeding_a_norm_and_no_other_is_standardized(family):
    model, inputs = _families()[family](WS_GN)
    model.eval()
    # Each conv output with its version counter: an in-place change after the conv (a residual
    # `+=`) makes the same tensor object something the conv did not compute. The tensors are
    # kept alive so that their ids are not reused.
    conv_outputs: dict[int, tuple[Tensor, int, nn.Module]] = {}
    fed_by: dict[nn.Module, set] = {}

    def record_output(module: nn.Module, args: tuple, output: Tensor) -> None:
        conv_outputs[id(output)] = (output, output._version, module)

    def record_input(module: nn.Module, args: tuple) -> None:
        tensor, version, conv = conv_outputs.get(id(args[0]), (None, None, None))
        fed = tensor is args[0] and version == args[0]._version
        fed_by.setdefault(module, set()).add(conv if fed else None)

    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    hooks = [
        m.register_forward_hook(record_output) for m in model.modules() if isinstance(m, _ConvNd)
    ]
    hooks += [m.register_forward_pre_hook(record_input) for m in norms]
    with torch.no_grad():
        model(*inputs)
    for hook in hooks:
        hook.remove()
    feeding = {conv for sources in fed_by.values() for conv in sources if conv is not None}
    standardized = {m for m in model.modules() if isinstance(m, _ConvNd) and is_standardized(m)}
    assert standardized == feeding
    assert len(standardized) == EXPECTED_STANDARDIZED[family]


def test_convert_norms_standardizes_and_fold_norms_bakes_then_folds():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)
    )
    model = convert_norms(model, {"name": "bn", "weight_standardization": True})
    assert [is_standardized(m) for m in model] == [True, False, False, True, False]
    model.train()(torch.randn(4, 3, 12, 12))  # running statistics off their defaults
    x = torch.randn(2, 3, 12, 12)
    folded, report = fold_norms(model, x)
    assert report.standardized_weights_baked == 2
    assert len(report.folded) == 2 and not report.unfolded
    assert not any(is_standardized(m) for m in folded.modules())
    assert is_standardized(model[0]) and is_standardized(model[3])  # the original is untouched
    torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-4, atol=1e-5)
    assert "standardised conv weights made constant: 2" in report.to_markdown()


def test_baking_keeps_outputs_and_state_dict_round_trips():
    from normlab.models import convnext_atto

    torch.manual_seed(2)
    model = convnext_atto(num_classes=10, norm=WS_GN).eval()
    again = convnext_atto(num_classes=10, norm=WS_GN).eval()
    again.load_state_dict(model.state_dict())  # the raw weights under parametrizations.*
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    torch.testing.assert_close(again(x), expected, rtol=0, atol=0)
    assert bake_standardized_weights(again) == 13
    torch.testing.assert_close(again(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("export_format", "fold"), [("torchscript", True), ("torchscript", False), ("onnx", True)]
)
def test_export_of_a_standardized_checkpoint(compose_config, fast, tmp_path, export_format, fold):
    from normlab.export import export
    from normlab.train import train

    cfg = compose_config(
        *fast,
        "norm.weight_standardization=true",
        "data.image_size=16",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "test=false",
    )
    train(cfg)
    checkpoint = f"{cfg.paths.output_dir}/checkpoints/last.ckpt"
    cfg = compose_config(
        f"ckpt_path={checkpoint}",
        f"format={export_format}",
        f"fold_norms={str(fold).lower()}",
        f"output_dir={tmp_path / 'export'}",
        config_name="export",
        run="export",
    )
    report = export(cfg)
    if not fold:
        assert report["folding"] is None and report["max_abs_difference_exported"] < 1e-4
        return
    folding = report["folding"]
    assert folding["standardized_weights_baked"] == 48 and len(folding["folded"]) == 48
    # Relative: after two steps the running variances are still near 1 while a standardised
    # conv's outputs have a variance near its fan-in, so the eval logits are in the hundreds.
    assert folding["max_relative_difference"] < 1e-5
    relative = folding["max_relative_difference"] / folding["max_abs_difference"]
    assert report["max_abs_difference_exported"] * relative < 1e-5


def test_config_validation_refuses_a_non_boolean_switch_before_building_anything():
    from omegaconf import OmegaConf

    from normlab.validation import _check_norm_spec

    spec = OmegaConf.create({"name": "gn", "weight_standardization": "maybe"})
    with pytest.raises(ConfigError, match=r"^norm\.weight_standardization must be true or false"):
        _check_norm_spec(spec, "norm")
    _check_norm_spec(OmegaConf.create({"name": "gn", "weight_standardization": True}), "norm")
