"""The parts of :mod:`normlab.models.retinanet` that are torchvision's with a change: the ResNet
whose norms can absorb the ReLU after them, the head with configurable losses, and the loading
of torchvision's weights (hash-checked, tensors only) into a model built with any norm."""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from normlab.errors import ConfigError
from normlab.norm import NormLayer, activation_after, fuse_norm_activations
from normlab.ranges import ArgumentError, check_choice

log = logging.getLogger(__name__)

BOX_LOSSES = ("l1", "smooth_l1", "giou")
BoxLoss = Literal["l1", "smooth_l1", "giou"]


class _FusableBasicBlock(BasicBlock):
    """torchvision's BasicBlock with a ReLU module of its own after bn1, so that bn1 can absorb it.

    torchvision's block calls one shared ``relu`` after bn1 and after the residual add, which no
    module swap can fuse. ``relu`` stays for the add (no norm output alone feeds it); parameter
    and buffer names are torchvision's.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.relu1 = activation_after(self.bn1, nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class _FusableBottleneck(Bottleneck):
    """torchvision's Bottleneck with ReLU modules of its own after bn1 and bn2 (see
    :class:`_FusableBasicBlock`); the shared ``relu`` stays for the residual add."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.relu1 = activation_after(self.bn1, nn.ReLU(inplace=True))
        self.relu2 = activation_after(self.bn2, nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


_RESNET_LAYOUTS: dict[int, tuple[type[BasicBlock | Bottleneck], list[int]]] = {
    18: (_FusableBasicBlock, [2, 2, 2, 2]),
    34: (_FusableBasicBlock, [3, 4, 6, 3]),
    50: (_FusableBottleneck, [3, 4, 6, 3]),
}


def fusable_resnet(depth: int, norm_layer: NormLayer) -> ResNet:
    """torchvision's ``resnet{depth}(norm_layer=...)`` (same modules, names and init) in which
    every ReLU that follows a norm alone can be absorbed by it."""
    block, layers = _RESNET_LAYOUTS[depth]
    resnet = ResNet(block, layers, norm_layer=norm_layer)
    # ResNet calls its own `relu` once, right after the stem's bn1.
    resnet.relu = activation_after(resnet.bn1, resnet.relu)
    return resnet


def freeze_resnet(resnet: nn.Module, trainable_layers: int) -> None:
    """Freeze all but the last ``trainable_layers`` stages (5 = everything trains)."""
    if not 0 <= trainable_layers <= 5:
        raise ArgumentError(
            "trainable_layers",
            trainable_layers,
            f"{{key}} must be in 0..5, got {trainable_layers}",
        )
    stages = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        stages.append("bn1")
    for name, parameter in resnet.named_parameters():
        if not any(name.startswith(stage) for stage in stages):
            parameter.requires_grad_(False)


class FocalLossHead(RetinaNetHead):
    """torchvision's RetinaNet head (same submodules and names) with configurable losses.

    ``focal_alpha`` / ``focal_gamma``: the focal loss's class balance and focusing parameter
    (``alpha=None`` disables balancing). ``box_loss``: ``l1`` or ``smooth_l1`` on the encoded
    box deltas (``smooth_l1_beta`` is the switch point), or ``giou`` on the decoded boxes.
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        norm_layer: NormLayer | None = None,
        *,
        prior_probability: float = 0.01,
        focal_alpha: float | None = 0.25,
        focal_gamma: float = 2.0,
        box_loss: BoxLoss = "l1",
        smooth_l1_beta: float = 1.0 / 9.0,
    ) -> None:
        super().__init__(in_channels, num_anchors, num_classes, norm_layer=norm_layer)
        # The towers are conv-norm-ReLU Sequentials: a norm that can apply the ReLU itself does.
        fuse_norm_activations(self)
        check_choice("box_loss", box_loss, BOX_LOSSES)
        if not 0.0 < prior_probability < 1.0:
            raise ArgumentError(
                "prior_probability",
                prior_probability,
                f"{{key}} must be in (0, 1), got {prior_probability}",
            )
        # The parent initialises the class bias for its own default prior (0.01).
        nn.init.constant_(
            self.classification_head.cls_logits.bias,
            -math.log((1 - prior_probability) / prior_probability),
        )
        self.focal_alpha = -1.0 if focal_alpha is None else float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.box_loss = box_loss
        self.smooth_l1_beta = float(smooth_l1_beta)

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
    ) -> dict[str, Tensor]:
        cls_losses, box_losses = [], []
        box_coder = self.regression_head.box_coder
        for target, logits, deltas, image_anchors, matched in zip(
            targets,
            head_outputs["cls_logits"],
            head_outputs["bbox_regression"],
            anchors,
            matched_idxs,
            strict=True,
        ):
            foreground = torch.where(matched >= 0)[0]
            # Never divide by zero: an image without boxes keeps its background term as is.
            normaliser = max(1, foreground.numel())
            gt_index = matched[foreground]

            # Anchors between the two IoU thresholds are ignored by the classification loss.
            valid = matched != self.classification_head.BETWEEN_THRESHOLDS
            cls_target = torch.zeros_like(logits)
            cls_target[foreground, target["labels"][gt_index]] = 1.0
            cls_losses.append(
                sigmoid_focal_loss(
                    logits[valid],
                    cls_target[valid],
                    alpha=self.focal_alpha,
                    gamma=self.focal_gamma,
                    reduction="sum",
                )
                / normaliser
            )

            gt_boxes = target["boxes"][gt_index]
            box_losses.append(
                self._box_loss(deltas[foreground], image_anchors[foreground], gt_boxes, box_coder)
                / normaliser
            )
        num_images = max(1, len(targets))
        return {
            "classification": torch.stack(cls_losses).sum() / num_images,
            "bbox_regression": torch.stack(box_losses).sum() / num_images,
        }

    def _box_loss(
        self, deltas: Tensor, anchors: Tensor, gt_boxes: Tensor, box_coder: Any
    ) -> Tensor:
        if self.box_loss == "giou":
            predicted = box_coder.decode_single(deltas, anchors)
            return generalized_box_iou_loss(predicted, gt_boxes, reduction="sum")
        target_deltas = box_coder.encode_single(gt_boxes, anchors)
        if self.box_loss == "l1":
            return F.l1_loss(deltas, target_deltas, reduction="sum")
        return F.smooth_l1_loss(deltas, target_deltas, beta=self.smooth_l1_beta, reduction="sum")


def takes_batchnorm_weights(norm_layer: NormLayer) -> bool:
    """Whether a norm layer has BatchNorm's parameters and buffers (so BN checkpoints load)."""
    keys = set(norm_layer(8).state_dict())
    return {"weight", "bias", "running_mean", "running_var"} <= keys


def resolve_weights(name: str | None, enum: type, key: str) -> Any:
    """A torchvision weights enum member from ``"COCO_V1"`` or ``"<EnumClass>.COCO_V1"``."""
    if name is None:
        return None
    try:
        if "." in name:
            return torchvision.models.get_weight(name)
        return enum[name]
    except (KeyError, ValueError, AttributeError) as error:
        allowed = ", ".join(f"{enum.__name__}.{member.name}" for member in enum)
        raise ConfigError(
            f"model.{key}={name!r} is not a torchvision weight; for this model: {allowed}"
        ) from error


def download_weights(weights: Any, progress: bool) -> dict[str, Tensor]:
    """A torchvision weights file, hash-checked and unpickled as tensors only: a tampered file
    cannot run code on load (torch.hub's default is a full unpickle)."""
    return weights.get_state_dict(progress=progress, check_hash=True, weights_only=True)


def load_weights(module: nn.Module, state_dict: dict[str, Tensor], what: str) -> None:
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as error:
        raise ConfigError(f"the {what} weights do not fit this model: {error}") from error


def load_detector_weights(model: RetinaNet, weights: Any, num_classes: int, progress: bool) -> None:
    """Load COCO weights; with another class count, every layer but the class logits."""
    state_dict = download_weights(weights, progress)
    coco_classes = len(weights.meta["categories"])
    if num_classes != coco_classes:
        logits = "head.classification_head.cls_logits."
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(logits)}
        log.info(
            "%s has %d classes, this model %d: class logits keep their initialisation",
            weights,
            coco_classes,
            num_classes,
        )
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        bad = [k for k in missing if not k.startswith(logits)] + list(unexpected)
        if bad:
            raise ConfigError(f"the weights {weights} do not fit this model: {bad[:8]}")
    else:
        load_weights(model, state_dict, str(weights))
    if weights.name == "COCO_V1" and "V2" not in type(weights).__name__:
        # The v1 checkpoint was trained with eps=0 in its frozen BatchNorms (torchvision does so).
        for module in model.backbone.body.modules():
            if hasattr(module, "running_var") and hasattr(module, "eps"):
                module.eps = 0.0
