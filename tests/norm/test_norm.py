"""The norm registry: specs, errors, custom norms and conversion of existing models."""

from __future__ import annotations

import re

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from omegaconf import OmegaConf
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.ops import FrozenBatchNorm2d

from normlab.errors import ConfigError
from normlab.norm import NORMS, LayerNorm2d, build_norm, convert_norms, norm_channels, register_norm
from normlab.norm.sync_batchnorm import SyncBatchNorm
from normlab.ops.batchnorm import CudaBatchNorm

EXPECTED_TYPES = {
    "bn": nn.BatchNorm2d,
    "syncbn": SyncBatchNorm,
    "ln": LayerNorm2d,
    "gn": nn.GroupNorm,
    "in": nn.InstanceNorm2d,
    "frozen_bn": FrozenBatchNorm2d,
    "none": nn.Identity,
    "cuda_bn": CudaBatchNorm,
}


def test_builtin_names_are_registered():
    assert set(EXPECTED_TYPES) <= set(NORMS)


@pytest.mark.parametrize("name", sorted(EXPECTED_TYPES))
def test_every_builtin_norm_takes_nchw(name):
    layer = build_norm(name, 12)
    assert isinstance(layer, EXPECTED_TYPES[name])
    assert norm_channels(layer) == 12
    x = torch.randn(4, 12, 5, 5)
    assert layer(x).shape == x.shape


def test_spec_forms_are_equivalent():
    as_name = build_norm("gn", 16)
    as_mapping = build_norm({"name": "gn", "num_groups": 4}, 16)
    as_dictconfig = build_norm(OmegaConf.create({"name": "gn", "num_groups": 4}), 16)
    as_callable = build_norm(lambda c: nn.GroupNorm(4, c), 16)
    assert as_name.num_groups == 16  # largest divisor of 16 that is ≤ 32
    assert as_mapping.num_groups == as_dictconfig.num_groups == as_callable.num_groups == 4


def test_unknown_name_lists_every_registered_norm():
    with pytest.raises(ConfigError) as error:
        build_norm("nope", 8)
    message = str(error.value)
    assert "'nope'" in message
    for name in NORMS:
        assert name in message


def test_unknown_argument_names_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"does not take momentum.*num_groups"):
        build_norm({"name": "gn", "momentum": 0.1}, 8)


def test_group_norm_divisibility_error_names_both_numbers():
    with pytest.raises(ConfigError, match=r"\b24 channels\b.*num_groups=7\b"):
        build_norm({"name": "gn", "num_groups": 7}, 24)
    with pytest.raises(ConfigError, match=r"\b24 channels\b.*group_size=5\b"):
        build_norm({"name": "gn", "group_size": 5}, 24)
    assert build_norm({"name": "gn", "group_size": 6}, 24).num_groups == 4


@pytest.mark.parametrize(("channels", "groups"), [(150, 30), (342, 19), (40, 20), (64, 32), (7, 7)])
def test_group_norm_default_uses_largest_divisor_up_to_32(channels, groups):
    assert build_norm("gn", channels).num_groups == groups


def test_layer_norm_2d_normalises_channels_per_pixel():
    x = torch.randn(2, 6, 3, 4)
    layer = LayerNorm2d(6)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    expected = F.layer_norm(x.permute(0, 2, 3, 1), (6,), layer.weight, layer.bias, 1e-6)
    torch.testing.assert_close(layer(x), expected.permute(0, 3, 1, 2))
    # It is not GroupNorm(1, C), which normalises over C, H and W together.
    assert not torch.allclose(layer(x), F.group_norm(x, 1, layer.weight, layer.bias, 1e-6))


def test_register_norm_from_user_code():
    @register_norm("scaled_bn_for_test")
    def scaled_bn(num_features: int, scale: float = 2.0) -> nn.Module:
        return nn.Sequential(nn.BatchNorm2d(num_features), nn.Identity())

    try:
        assert isinstance(
            build_norm({"name": "scaled_bn_for_test", "scale": 3.0}, 4), nn.Sequential
        )
        with pytest.raises(ValueError, match="already registered"):
            register_norm("scaled_bn_for_test")(scaled_bn)
        from normlab.models import densenet_bc_100

        model = densenet_bc_100(num_classes=10, norm="scaled_bn_for_test")
        assert any(isinstance(m, nn.Sequential) and len(m) == 2 for m in model.modules())
    finally:
        NORMS.pop("scaled_bn_for_test")


def test_convert_resnet18_to_layer_norm_leaves_no_batch_norm():
    model = convert_norms(torchvision.models.resnet18(num_classes=5), "ln")
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())
    assert sum(isinstance(m, LayerNorm2d) for m in model.modules()) == 20
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def _trained_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight)
            nn.init.normal_(module.bias)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 32, 32))
    return model


def test_bn_to_syncbn_and_back_keeps_every_tensor_bit_for_bit():
    model = _trained_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convert_norms(model, "syncbn")
    assert sum(isinstance(m, SyncBatchNorm) for m in model.modules()) == 20
    convert_norms(model, "bn")
    assert not any(isinstance(m, SyncBatchNorm) for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
        assert value.dtype == after[key].dtype, key
    assert model.training


def test_bn_to_frozen_bn_keeps_statistics_and_eval_outputs():
    model = _trained_resnet().eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    convert_norms(model, "frozen_bn")
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == 20
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_convert_timm_convnext_layer_norms_and_keep_affine_weights():
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=3)
    stem_norm = model.stem[1]
    with torch.no_grad():
        stem_norm.weight.normal_()
    weight = stem_norm.weight.clone()
    convert_norms(model, "bn")
    assert isinstance(model.stem[1], nn.BatchNorm2d)
    assert torch.equal(model.stem[1].weight, weight)
    assert not any(isinstance(m, timm.layers.LayerNorm2d) for m in model.modules())
    model.eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_none_converts_back_to_a_norm():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    convert_norms(model, "none")
    assert type(model[1]).__name__ == "NoNorm"
    convert_norms(model, "gn")
    assert isinstance(model[1], nn.GroupNorm) and model[1].num_channels == 8


def test_convert_a_bare_norm_returns_its_replacement():
    converted = convert_norms(nn.BatchNorm2d(4), {"name": "gn", "num_groups": 2})
    assert isinstance(converted, nn.GroupNorm)


def test_channels_last_layer_norm_is_left_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    convert_norms(model, "bn")
    assert type(model[1]) is nn.LayerNorm


def test_convert_errors_before_touching_the_model():
    model = nn.Sequential(nn.BatchNorm2d(6))
    with pytest.raises(ConfigError, match=re.escape("unknown norm 'nope'")):
        convert_norms(model, "nope")
    assert isinstance(model[0], nn.BatchNorm2d)
