"""RetinaNet (Lin et al., "Focal Loss for Dense Object Detection", 2017) with pluggable norms.

The detector *is* torchvision's ``RetinaNet``: its image transform, anchor matching (IoU ≥ 0.5
foreground, < 0.4 background, low-quality matches kept), box coder, per-level top-k, class-wise
batched NMS and detection limit. What this module adds is the part the norm registry has to
reach: the ResNet backbone is built with ``norm_layer`` from the registry, the two 4-conv towers
with ``head_norm`` (``gn`` gives the v2-style GroupNorm heads), and the FPN optionally with
``fpn_norm``. Module names are torchvision's, so its state dicts load strictly. A norm that can
apply the ReLU after it in its own kernel (``normlab.norm.fusion``) absorbs it everywhere one
follows a norm: in the head's towers, the backbone's stem and the residual blocks' first (basic)
or first two (bottleneck) convolutions.

The losses are computed by :class:`FocalLossHead`: the focal loss with configurable α and γ and a
selectable box loss (L1, smooth-L1, GIoU), each normalised per image by the number of foreground
anchors (at least one, so an image without boxes contributes only its background term) and then
averaged over the batch, as torchvision does. With the defaults the losses equal torchvision's.

One file per architecture, as torchvision keeps its own: backbone, FPN, heads and losses are
read together when checking parity with the reference, so the file stays whole despite its length.

Image sizes: in eval mode the model resizes each image (shorter side ``min_size``, longer side at
most ``max_size``) and maps detections back to the input's coordinates. In training it does the
same unless ``resize_in_training=False``, which leaves sizing to the data pipeline (scale
augmentation in the data module would otherwise be undone by the model's own resize).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Literal, TypedDict

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from typing_extensions import Unpack

from normlab.errors import ConfigError
from normlab.norm import (
    NormLayer,
    NormSpec,
    activation_after,
    fuse_norm_activations,
    get_norm_layer,
    norm_name,
    norm_traits,
    standardize_conv_weights,
)
from normlab.ranges import (
    COUNT,
    FRACTION,
    NON_NEGATIVE,
    ArgumentError,
    ValueRange,
    checked_arguments,
)

__all__ = [
    "BOX_LOSSES",
    "DenseRetinaNet",
    "FocalLossHead",
    "retinanet_resnet18_fpn",
    "retinanet_resnet34_fpn",
    "retinanet_resnet50_fpn",
]

log = logging.getLogger(__name__)

BOX_LOSSES = ("l1", "smooth_l1", "giou")
BoxLoss = Literal["l1", "smooth_l1", "giou"]

_RESNET_C5_CHANNELS = {18: 512, 34: 512, 50: 2048}


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


def _resnet(depth: int, norm_layer: NormLayer) -> ResNet:
    """torchvision's ``resnet{depth}(norm_layer=...)`` (same modules, names and init) in which
    every ReLU that follows a norm alone can be absorbed by it."""
    block, layers = _RESNET_LAYOUTS[depth]
    resnet = ResNet(block, layers, norm_layer=norm_layer)
    # ResNet calls its own `relu` once, right after the stem's bn1.
    resnet.relu = activation_after(resnet.bn1, resnet.relu)
    return resnet


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
        if box_loss not in BOX_LOSSES:
            raise ArgumentError(
                "box_loss", box_loss, f"{{key}}={box_loss!r} is not one of {', '.join(BOX_LOSSES)}"
            )
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


class DenseRetinaNet(nn.Module):
    """The network of a RetinaNet without its pre- and post-processing: a batched, normalised
    image tensor (what ``detector.transform`` makes of a list of images) → the head's class
    logits (N × anchors × classes) and box deltas (N × anchors × 4), all FPN levels
    concatenated, as torchvision's head returns them.

    This is the part with every convolution and norm, and a plain tensor → tensors function that
    TorchScript tracing and ONNX export can take; resizing, anchors, box decoding and NMS stay in
    Python (``detector.transform`` and ``detector.postprocess_detections``).
    """

    def __init__(self, detector: RetinaNet) -> None:
        super().__init__()
        self.backbone = detector.backbone
        self.head = detector.head

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        outputs = self.head(list(self.backbone(images).values()))
        return outputs["cls_logits"], outputs["bbox_regression"]


def _octave_anchor_sizes(base_sizes: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Three octave scales 2^0, 2^(1/3), 2^(2/3) per level, rounded down to ints as torchvision."""
    return tuple((size, int(size * 2 ** (1 / 3)), int(size * 2 ** (2 / 3))) for size in base_sizes)


def _takes_batchnorm_weights(norm_layer: NormLayer) -> bool:
    """Whether a norm layer has BatchNorm's parameters and buffers (so BN checkpoints load)."""
    keys = set(norm_layer(8).state_dict())
    return {"weight", "bias", "running_mean", "running_var"} <= keys


def _resolve_weights(name: str | None, enum: type, key: str) -> Any:
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


def _freeze_resnet(resnet: nn.Module, trainable_layers: int) -> None:
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


class RetinaNetOptions(TypedDict, total=False):
    """Keyword options shared by the ``retinanet_resnet*_fpn`` constructors."""

    head_norm: NormSpec | None
    fpn_norm: NormSpec | None
    fpn_channels: int
    p6p7_from: Literal["p5", "c5"]
    anchor_sizes: Sequence[int]
    aspect_ratios: Sequence[float]
    prior_probability: float
    focal_alpha: float | None
    focal_gamma: float
    box_loss: BoxLoss
    smooth_l1_beta: float
    fg_iou_thresh: float
    bg_iou_thresh: float
    score_thresh: float
    nms_thresh: float
    topk_candidates: int
    detections_per_img: int
    min_size: int | Sequence[int]
    max_size: int
    image_mean: Sequence[float]
    image_std: Sequence[float]
    resize_in_training: bool
    trainable_layers: int | None
    weights: str | None
    weights_backbone: str | None
    progress: bool


def _retinanet_resnet_fpn(
    depth: int,
    num_classes: int,
    norm: NormSpec = "bn",
    head_norm: NormSpec | None = None,
    fpn_norm: NormSpec | None = None,
    fpn_channels: int = 256,
    p6p7_from: Literal["p5", "c5"] = "p5",
    anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    prior_probability: float = 0.01,
    focal_alpha: float | None = 0.25,
    focal_gamma: float = 2.0,
    box_loss: BoxLoss = "l1",
    smooth_l1_beta: float = 1.0 / 9.0,
    fg_iou_thresh: float = 0.5,
    bg_iou_thresh: float = 0.4,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    topk_candidates: int = 1000,
    detections_per_img: int = 300,
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    image_mean: Sequence[float] = (0.485, 0.456, 0.406),
    image_std: Sequence[float] = (0.229, 0.224, 0.225),
    resize_in_training: bool = True,
    trainable_layers: int | None = None,
    weights: str | None = None,
    weights_backbone: str | None = None,
    progress: bool = True,
) -> RetinaNet:
    if p6p7_from not in ("p5", "c5"):
        raise ArgumentError(
            "p6p7_from", p6p7_from, f"{{key}} must be 'p5' or 'c5', got {p6p7_from!r}"
        )
    if len(anchor_sizes) != 5:
        raise ArgumentError(
            "anchor_sizes",
            anchor_sizes,
            f"{{key}} needs one size per level P3..P7, got {anchor_sizes}",
        )
    if not bg_iou_thresh <= fg_iou_thresh:
        raise ArgumentError(
            "bg_iou_thresh",
            bg_iou_thresh,
            f"{{key}} ({bg_iou_thresh}) must not exceed fg_iou_thresh ({fg_iou_thresh})",
        )
    norm_layer = get_norm_layer(norm)
    # A head norm that does not normalise (none) means no norm, so the convolutions keep their
    # biases (v1 heads).
    head_traits = norm_traits(head_norm)
    normalises = head_traits is None or head_traits.normalises
    head_layer = head_norm if head_norm is not None and normalises else None
    head_norm_layer = None if head_layer is None else get_norm_layer(head_layer)
    fpn_norm_layer = None if fpn_norm is None else get_norm_layer(fpn_norm)
    # A norm with batch statistics in a head shared by all FPN levels mixes the statistics of five
    # differently scaled feature maps (detectron2 keeps one norm per level).
    if head_traits is not None and head_traits.batch_statistics:
        log.warning(
            "head_norm=%s: the head is shared by all FPN levels, so its batch statistics mix "
            "five feature scales; gn is the usual choice for heads",
            norm_name(head_norm),
        )

    backbone_enum = getattr(torchvision.models, f"ResNet{depth}_Weights")
    detector_weights = None
    if weights is not None:
        if depth != 50:
            raise ArgumentError(
                "weights",
                weights,
                f"{{key}}: torchvision has COCO RetinaNet weights for ResNet-50 only, not "
                f"ResNet-{depth}; use weights_backbone for ImageNet weights",
            )
        detector_weights = _resolve_weights(
            weights, torchvision.models.detection.RetinaNet_ResNet50_FPN_Weights, "weights"
        )
        weights_backbone = None  # the detector checkpoint holds the backbone too
    backbone_weights = _resolve_weights(weights_backbone, backbone_enum, "weights_backbone")
    pretrained = detector_weights is not None or backbone_weights is not None
    if pretrained and not _takes_batchnorm_weights(norm_layer):
        raise ConfigError(
            f"norm={norm_name(norm) or norm!r} cannot take the BatchNorm weights of "
            f"{detector_weights or backbone_weights}; use a BatchNorm-like norm (bn, syncbn, "
            "frozen_bn, cuda_bn) or train from scratch (weights=null, weights_backbone=null)"
        )
    if trainable_layers is None:
        # torchvision's rule: fine-tune the last three stages of a pretrained backbone.
        trainable_layers = 3 if pretrained else 5

    resnet = _resnet(depth, norm_layer)
    if backbone_weights is not None:
        _load_state_dict(resnet, _download(backbone_weights, progress), "backbone")
    _freeze_resnet(resnet, trainable_layers)

    stage_channels = _RESNET_C5_CHANNELS[depth] // 8
    extra_in = fpn_channels if p6p7_from == "p5" else _RESNET_C5_CHANNELS[depth]
    extra_blocks = LastLevelP6P7(extra_in, fpn_channels)
    # torchvision infers the source from the channel counts; state it so that equal counts
    # (e.g. ResNet-18's 512-channel C5 with a 512-channel FPN) cannot flip it.
    extra_blocks.use_P5 = p6p7_from == "p5"
    backbone = BackboneWithFPN(
        resnet,
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=[stage_channels * 2, stage_channels * 4, stage_channels * 8],
        out_channels=fpn_channels,
        extra_blocks=extra_blocks,
        norm_layer=fpn_norm_layer,
    )

    anchor_generator = AnchorGenerator(
        _octave_anchor_sizes(anchor_sizes), (tuple(aspect_ratios),) * len(anchor_sizes)
    )
    head = FocalLossHead(
        fpn_channels,
        anchor_generator.num_anchors_per_location()[0],
        num_classes,
        norm_layer=head_norm_layer,
        prior_probability=prior_probability,
        focal_alpha=focal_alpha,
        focal_gamma=focal_gamma,
        box_loss=box_loss,
        smooth_l1_beta=smooth_l1_beta,
    )
    model = RetinaNet(
        backbone,
        num_classes,
        min_size=min_size if isinstance(min_size, int) else tuple(min_size),
        max_size=max_size,
        image_mean=list(image_mean),
        image_std=list(image_std),
        anchor_generator=anchor_generator,
        head=head,
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
        fg_iou_thresh=fg_iou_thresh,
        bg_iou_thresh=bg_iou_thresh,
        topk_candidates=topk_candidates,
        _skip_resize=not resize_in_training,
    )
    if detector_weights is not None:
        _load_detector_weights(model, detector_weights, num_classes, progress)
    standardize_conv_weights(model)  # norm.weight_standardization=true (any of the three norms)
    return model


def _download(weights: Any, progress: bool) -> dict[str, Tensor]:
    """A torchvision weights file, hash-checked and unpickled as tensors only: a tampered file
    cannot run code on load (torch.hub's default is a full unpickle)."""
    return weights.get_state_dict(progress=progress, check_hash=True, weights_only=True)


def _load_state_dict(module: nn.Module, state_dict: dict[str, Tensor], what: str) -> None:
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as error:
        raise ConfigError(f"the {what} weights do not fit this model: {error}") from error


def _load_detector_weights(
    model: RetinaNet, weights: Any, num_classes: int, progress: bool
) -> None:
    """Load COCO weights; with another class count, every layer but the class logits."""
    state_dict = _download(weights, progress)
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
        _load_state_dict(model, state_dict, str(weights))
    if weights.name == "COCO_V1" and "V2" not in type(weights).__name__:
        # The v1 checkpoint was trained with eps=0 in its frozen BatchNorms (torchvision does so).
        for module in model.backbone.body.modules():
            if hasattr(module, "running_var") and hasattr(module, "eps"):
                module.eps = 0.0


# The numeric options of the retinanet_resnet*_fpn constructors.
_RETINANET_RANGES = {
    "num_classes": COUNT,
    "fpn_channels": COUNT,
    "prior_probability": ValueRange(low=0, high=1, low_open=True, high_open=True),
    # null turns the class balance off.
    "focal_alpha": ValueRange(low=0, high=1, nullable=True),
    "focal_gamma": NON_NEGATIVE,
    "smooth_l1_beta": NON_NEGATIVE,
    "fg_iou_thresh": FRACTION,
    "bg_iou_thresh": FRACTION,
    "score_thresh": FRACTION,
    "nms_thresh": FRACTION,
    "topk_candidates": COUNT,
    "detections_per_img": COUNT,
    "max_size": COUNT,
}


@checked_arguments(**_RETINANET_RANGES)
def retinanet_resnet18_fpn(
    num_classes: int, norm: NormSpec = "bn", **options: Unpack[RetinaNetOptions]
) -> RetinaNet:
    """RetinaNet with a ResNet-18 FPN backbone (CPU-sized experiments)."""
    return _retinanet_resnet_fpn(18, num_classes, norm, **options)


@checked_arguments(**_RETINANET_RANGES)
def retinanet_resnet34_fpn(
    num_classes: int, norm: NormSpec = "bn", **options: Unpack[RetinaNetOptions]
) -> RetinaNet:
    """RetinaNet with a ResNet-34 FPN backbone."""
    return _retinanet_resnet_fpn(34, num_classes, norm, **options)


@checked_arguments(**_RETINANET_RANGES)
def retinanet_resnet50_fpn(
    num_classes: int, norm: NormSpec = "bn", **options: Unpack[RetinaNetOptions]
) -> RetinaNet:
    """RetinaNet R50-FPN. ``head_norm="gn"``, ``p6p7_from="c5"``, ``box_loss="giou"`` is v2."""
    return _retinanet_resnet_fpn(50, num_classes, norm, **options)
