"""RetinaNet: parity with torchvision, the norm registry reaching every layer, loss edge cases."""

from __future__ import annotations

import logging

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights
from torchvision.models.detection import retinanet_resnet50_fpn as tv_retinanet_resnet50_fpn
from torchvision.ops.misc import FrozenBatchNorm2d

from normlab.errors import ConfigError
from normlab.models import retinanet_resnet18_fpn, retinanet_resnet50_fpn
from normlab.models.retinanet import _octave_anchor_sizes
from normlab.norm import convert_norms
from normlab.norm.builtin import Float32LayerNorm2d, InstanceNorm2d
from normlab.norm.sync_batchnorm import SyncBatchNorm

SIZE = {"min_size": 96, "max_size": 128}


def _images_and_targets() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 128, generator=generator) for _ in range(3)]
    targets = [
        {
            "boxes": torch.tensor([[10.0, 20, 60, 80], [30, 30, 50, 90]]),
            "labels": torch.tensor([3, 7]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
        {"boxes": torch.tensor([[5.0, 5, 120, 90]]), "labels": torch.tensor([90])},
    ]
    return images, targets


def _randomise_statistics(model: nn.Module) -> None:
    """Non-trivial running statistics, so that a norm mix-up changes the outputs."""
    generator = torch.Generator().manual_seed(1)
    for name, buffer in model.named_buffers():
        if name.endswith("running_mean"):
            buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
        elif name.endswith("running_var"):
            buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))


@pytest.fixture(scope="module")
def frozen_pair() -> tuple[nn.Module, nn.Module]:
    """torchvision's R50 RetinaNet (its BNs turned into FrozenBatchNorm2d, as torchvision does for
    pretrained weights) and ours with norm=frozen_bn loaded from its state dict."""
    torch.manual_seed(0)
    reference = tv_retinanet_resnet50_fpn(weights=None, weights_backbone=None, **SIZE)
    _randomise_statistics(reference)
    state = reference.state_dict()
    ours = retinanet_resnet50_fpn(91, norm="frozen_bn", **SIZE)
    ours.load_state_dict(state, strict=True)
    reference = convert_norms(reference, lambda c: FrozenBatchNorm2d(c))
    return reference, ours


def test_torchvision_state_dict_loads_strictly_with_every_bn_like_norm() -> None:
    state = tv_retinanet_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    for norm in ("bn", "frozen_bn"):
        model = retinanet_resnet50_fpn(91, norm=norm)
        assert model.load_state_dict(state, strict=True)
        assert sorted(model.state_dict()) == sorted(
            k for k in state if norm == "bn" or not k.endswith("num_batches_tracked")
        )


def test_parameter_counts_match_torchvision() -> None:
    def count(model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    assert count(retinanet_resnet50_fpn(91, norm="bn")) == 34_068_119
    assert count(retinanet_resnet50_fpn(91, norm="frozen_bn")) == 34_014_999
    v2 = retinanet_resnet50_fpn(91, norm="bn", head_norm="gn", p6p7_from="c5", box_loss="giou")
    assert count(v2) == 38_198_935


def test_anchor_sizes_are_rounded_like_torchvision() -> None:
    assert _octave_anchor_sizes([32, 64, 128, 256, 512]) == tuple(
        (x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in [32, 64, 128, 256, 512]
    )
    assert _octave_anchor_sizes([32])[0] == (32, 40, 50)


def test_training_losses_equal_torchvision(frozen_pair) -> None:
    reference, ours = frozen_pair
    reference.train()
    ours.train()
    images, targets = _images_and_targets()
    expected = reference(images, targets)
    got = ours(images, targets)
    assert set(got) == {"classification", "bbox_regression"}
    for key, value in expected.items():
        assert torch.isfinite(value)
        assert abs(got[key].item() - value.item()) <= 1e-5 * abs(value.item()), key


def test_detections_equal_torchvision_in_eval(frozen_pair) -> None:
    reference, ours = frozen_pair
    reference.eval()
    ours.eval()
    # Untrained scores sit near the 0.01 prior: a zero threshold makes detections appear.
    reference.score_thresh = ours.score_thresh = 0.0
    images, _ = _images_and_targets()
    with torch.no_grad():
        expected, got = reference(images), ours(images)
    for e, g in zip(expected, got, strict=True):
        assert len(e["boxes"]) == 300
        torch.testing.assert_close(g["boxes"], e["boxes"], rtol=0, atol=1e-4)
        torch.testing.assert_close(g["scores"], e["scores"], rtol=0, atol=1e-6)
        assert torch.equal(g["labels"], e["labels"])


def test_batch_statistics_losses_equal_torchvision_with_bn() -> None:
    torch.manual_seed(0)
    reference = tv_retinanet_resnet50_fpn(weights=None, weights_backbone=None, **SIZE).train()
    ours = retinanet_resnet50_fpn(91, norm="bn", **SIZE).train()
    ours.load_state_dict(reference.state_dict())
    images, targets = _images_and_targets()
    expected, got = reference(images, targets), ours(images, targets)
    for key, value in expected.items():
        assert abs(got[key].item() - value.item()) <= 1e-5 * abs(value.item()), key
    torch.testing.assert_close(
        ours.backbone.body.bn1.running_mean, reference.backbone.body.bn1.running_mean
    )


def _small(**options) -> nn.Module:
    defaults = {
        "min_size": 64,
        "max_size": 64,
        "fpn_channels": 32,
        "anchor_sizes": [16, 32, 64, 128, 256],
    }
    return retinanet_resnet18_fpn(4, **{**defaults, **options})


@pytest.mark.parametrize("norm", ["bn", "gn", "ln", "in", "frozen_bn", "none", "syncbn"])
def test_every_backbone_norm_comes_from_the_registry(norm: str) -> None:
    model = _small(norm=norm, head_norm="gn")
    expected = {
        "bn": nn.BatchNorm2d,
        "gn": nn.GroupNorm,
        # ln normalises bf16 input in float32, in runs channels_last input without copies: both
        # are normlab's subclasses of the torch/timm layers.
        "ln": Float32LayerNorm2d,
        "in": InstanceNorm2d,
        "frozen_bn": FrozenBatchNorm2d,
        "syncbn": SyncBatchNorm,
    }
    body_norms = [
        m
        for n, m in model.backbone.body.named_modules()
        if n.endswith(("bn1", "bn2", "bn3", "downsample.1"))
    ]
    assert body_norms
    if norm == "none":
        assert not any(
            isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in model.backbone.body.modules()
        )
    else:
        assert all(type(m) is expected[norm] for m in body_norms)
    head_norms = [m for m in model.head.modules() if isinstance(m, nn.GroupNorm)]
    assert len(head_norms) == 8  # 4 per tower
    assert all(m.num_groups == 32 for m in head_norms)


def test_head_norm_none_keeps_conv_biases_and_v1_heads_have_no_norm() -> None:
    for head_norm in (None, "none"):
        head = _small(head_norm=head_norm).head
        convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
        assert all(c.bias is not None for c in convs)
        assert not any(isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)) for m in head.modules())
    gn_head = _small(head_norm={"name": "gn", "num_groups": 8}).head
    assert all(m.num_groups == 8 for m in gn_head.modules() if isinstance(m, nn.GroupNorm))
    tower_convs = [m[0] for m in gn_head.classification_head.conv]
    assert all(c.bias is None for c in tower_convs)


def test_batch_statistics_head_norm_warns(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        _small(head_norm="bn")
    assert "shared by all FPN levels" in caplog.text


def test_p6p7_source_is_explicit() -> None:
    from_p5 = _small(fpn_channels=512, p6p7_from="p5").backbone.fpn.extra_blocks
    from_c5 = _small(fpn_channels=512, p6p7_from="c5").backbone.fpn.extra_blocks
    # ResNet-18's C5 and this FPN both have 512 channels: torchvision alone would pick P5 twice.
    assert from_p5.use_P5 and not from_c5.use_P5
    assert from_c5.p6.in_channels == 512


def test_prior_probability_sets_the_class_bias() -> None:
    bias = _small(prior_probability=0.05).head.classification_head.cls_logits.bias
    torch.testing.assert_close(torch.sigmoid(bias), torch.full_like(bias, 0.05))


def _loss(model: nn.Module, targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    images = [
        torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i))
        for i in range(len(targets))
    ]
    return model.train()(images, targets)


@pytest.mark.parametrize("box_loss", ["l1", "smooth_l1", "giou"])
@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_batch_without_any_box_has_finite_losses_and_gradients(box_loss: str, norm: str) -> None:
    torch.manual_seed(0)
    model = _small(norm=norm, box_loss=box_loss)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = _loss(model, [empty, empty])
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(losses["classification"]) and losses["classification"] > 0
    assert losses["bbox_regression"].item() == 0.0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_box_losses_differ_and_focal_parameters_matter() -> None:
    target = [{"boxes": torch.tensor([[8.0, 8, 40, 50]]), "labels": torch.tensor([1])}]
    values = {}
    for box_loss in ("l1", "smooth_l1", "giou"):
        torch.manual_seed(0)
        values[box_loss] = _loss(_small(box_loss=box_loss), target)["bbox_regression"].item()
    assert len(set(values.values())) == 3 and all(v > 0 for v in values.values())
    torch.manual_seed(0)
    default = _loss(_small(), target)["classification"].item()
    torch.manual_seed(0)
    gamma0 = _loss(_small(focal_gamma=0.0), target)["classification"].item()
    assert gamma0 > default  # γ down-weights easy background anchors


def test_bad_options_name_the_key() -> None:
    with pytest.raises(ConfigError, match="box_loss"):
        _small(box_loss="iou")
    with pytest.raises(ConfigError, match="p6p7_from"):
        _small(p6p7_from="p4")
    with pytest.raises(ConfigError, match="trainable_layers"):
        _small(trainable_layers=6)
    with pytest.raises(ConfigError, match="unknown norm"):
        _small(head_norm="nope")


def test_pretrained_weights_need_a_batchnorm_like_norm() -> None:
    with pytest.raises(ConfigError, match="norm='ln' cannot take the BatchNorm weights"):
        _small(norm="ln", weights_backbone="IMAGENET1K_V1")
    with pytest.raises(
        ConfigError, match=r"model\.weights_backbone='IMAGENET9'.*ResNet18_Weights\.IMAGENET1K_V1"
    ):
        _small(weights_backbone="IMAGENET9")
    with pytest.raises(ConfigError, match="ResNet-50 only"):
        _small(weights="COCO_V1")


def test_trainable_layers_freeze_early_stages() -> None:
    model = _small(trainable_layers=2)
    trainable = {
        n.split(".")[2]
        for n, p in model.backbone.body.named_parameters(prefix="backbone.body")
        if p.requires_grad
    }
    assert trainable == {"layer3", "layer4"}


def test_coco_weights_go_through_torchvision_enum(monkeypatch) -> None:
    """No network here: the enum's download is replaced by a locally built checkpoint."""
    torch.manual_seed(0)
    checkpoint = tv_retinanet_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    requested = []

    def fake_get_state_dict(self, *args, **kwargs):
        requested.append(self)
        return checkpoint

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", fake_get_state_dict)
    model = retinanet_resnet50_fpn(91, norm="frozen_bn", weights="COCO_V1")
    assert requested == [RetinaNet_ResNet50_FPN_Weights.COCO_V1]
    torch.testing.assert_close(
        model.state_dict()["head.classification_head.cls_logits.weight"],
        checkpoint["head.classification_head.cls_logits.weight"],
    )
    assert model.backbone.body.bn1.eps == 0.0
    # Defaults when pretrained: 3 trainable stages, as torchvision.
    assert not model.backbone.body.layer1[0].conv1.weight.requires_grad
    assert model.backbone.body.layer2[0].conv1.weight.requires_grad

    # Another class count: everything but the class logits is loaded.
    ten = retinanet_resnet50_fpn(10, norm="bn", weights="COCO_V1")
    torch.testing.assert_close(
        ten.backbone.body.conv1.weight, checkpoint["backbone.body.conv1.weight"]
    )
    assert ten.head.classification_head.cls_logits.out_channels == 9 * 10

    with pytest.raises(ConfigError, match="do not fit"):
        retinanet_resnet50_fpn(91, norm="bn", head_norm="gn", weights="COCO_V1")
