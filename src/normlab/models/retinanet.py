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

This file assembles the detector from named parts (norms, pretrained weights, backbone with FPN,
anchors, head); the parts that are torchvision's with a change (the fusable ResNet blocks, the
head's losses, the weight loading) are in :mod:`normlab.models.retinanet_parts`.

Image sizes: in eval mode the model resizes each image (shorter side ``min_size``, longer side at
most ``max_size``) and maps detections back to the input's coordinates. In training it does the
same unless ``resize_in_training=False``, which leaves sizing to the data pipeline (scale
augmentation in the data module would otherwise be undone by the model's own resize).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, TypedDict

import torchvision
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from typing_extensions import Unpack

from normlab.errors import ConfigError
from normlab.models.retinanet_parts import (
    BOX_LOSSES,
    BoxLoss,
    FocalLossHead,
    download_weights,
    freeze_resnet,
    fusable_resnet,
    load_detector_weights,
    load_weights,
    resolve_weights,
    takes_batchnorm_weights,
)
from normlab.norm import (
    NormLayer,
    NormSpec,
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

_RESNET_C5_CHANNELS = {18: 512, 34: 512, 50: 2048}


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


class _NormLayers(NamedTuple):
    """The layers a spec of each of the detector's three norms builds (None: no norm there)."""

    backbone: NormLayer
    head: NormLayer | None
    fpn: NormLayer | None


def _norm_layers(
    norm: NormSpec, head_norm: NormSpec | None, fpn_norm: NormSpec | None
) -> _NormLayers:
    """Resolve (and so validate) the three norm specs before anything is built."""
    # A head norm that does not normalise (none) means no norm, so the convolutions keep their
    # biases (v1 heads).
    head_traits = norm_traits(head_norm)
    normalises = head_traits is None or head_traits.normalises
    head_layer = head_norm if head_norm is not None and normalises else None
    norms = _NormLayers(
        get_norm_layer(norm),
        None if head_layer is None else get_norm_layer(head_layer),
        None if fpn_norm is None else get_norm_layer(fpn_norm),
    )
    # A norm with batch statistics in a head shared by all FPN levels mixes the statistics of five
    # differently scaled feature maps (detectron2 keeps one norm per level).
    if head_traits is not None and head_traits.batch_statistics:
        log.warning(
            "head_norm=%s: the head is shared by all FPN levels, so its batch statistics mix "
            "five feature scales; gn is the usual choice for heads",
            norm_name(head_norm),
        )
    return norms


class _PretrainedWeights(NamedTuple):
    """The torchvision weights a detector starts from: COCO weights of the whole detector, or
    ImageNet weights of its ResNet, or neither (None)."""

    detector: Any
    backbone: Any

    @property
    def given(self) -> bool:
        return self.detector is not None or self.backbone is not None


def _pretrained_weights(
    depth: int,
    norm: NormSpec,
    norm_layer: NormLayer,
    weights: str | None,
    weights_backbone: str | None,
) -> _PretrainedWeights:
    """Resolve ``weights`` / ``weights_backbone`` (the detector's hold its backbone's too) and
    refuse a backbone norm that cannot take their BatchNorm tensors."""
    detector_weights = None
    if weights is not None:
        if depth != 50:
            raise ArgumentError(
                "weights",
                weights,
                f"{{key}}: torchvision has COCO RetinaNet weights for ResNet-50 only, not "
                f"ResNet-{depth}; use weights_backbone for ImageNet weights",
            )
        detector_weights = resolve_weights(
            weights, torchvision.models.detection.RetinaNet_ResNet50_FPN_Weights, "weights"
        )
        weights_backbone = None  # the detector checkpoint holds the backbone too
    backbone_enum = getattr(torchvision.models, f"ResNet{depth}_Weights")
    backbone_weights = resolve_weights(weights_backbone, backbone_enum, "weights_backbone")
    pretrained = _PretrainedWeights(detector_weights, backbone_weights)
    if pretrained.given and not takes_batchnorm_weights(norm_layer):
        raise ConfigError(
            f"norm={norm_name(norm) or norm!r} cannot take the BatchNorm weights of "
            f"{detector_weights or backbone_weights}; use a BatchNorm-like norm (bn, syncbn, "
            "frozen_bn, cuda_bn) or train from scratch (weights=null, weights_backbone=null)"
        )
    return pretrained


def _resnet_fpn_backbone(
    depth: int,
    norms: _NormLayers,
    fpn_channels: int,
    p6p7_from: Literal["p5", "c5"],
    trainable_layers: int,
    weights: Any,
    progress: bool,
) -> BackboneWithFPN:
    """The ResNet (ImageNet ``weights`` loaded if given, the first stages frozen) under an FPN
    over C3..C5 with P6/P7 computed from ``p6p7_from``."""
    resnet = fusable_resnet(depth, norms.backbone)
    if weights is not None:
        load_weights(resnet, download_weights(weights, progress), "backbone")
    freeze_resnet(resnet, trainable_layers)

    stage_channels = _RESNET_C5_CHANNELS[depth] // 8
    extra_in = fpn_channels if p6p7_from == "p5" else _RESNET_C5_CHANNELS[depth]
    extra_blocks = LastLevelP6P7(extra_in, fpn_channels)
    # torchvision infers the source from the channel counts; state it so that equal counts
    # (e.g. ResNet-18's 512-channel C5 with a 512-channel FPN) cannot flip it.
    extra_blocks.use_P5 = p6p7_from == "p5"
    return BackboneWithFPN(
        resnet,
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=[stage_channels * 2, stage_channels * 4, stage_channels * 8],
        out_channels=fpn_channels,
        extra_blocks=extra_blocks,
        norm_layer=norms.fpn,
    )


def _check_levels(
    p6p7_from: str, anchor_sizes: Sequence[int], fg_iou_thresh: float, bg_iou_thresh: float
) -> None:
    """The options that must agree with the five pyramid levels P3..P7 and with each other."""
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
    """The detector of the ``retinanet_resnet*_fpn`` constructors, taking every option a config
    can set (torchvision's defaults). The parts are built in a fixed order (backbone, FPN, head),
    so a seed initialises the same parameters."""
    _check_levels(p6p7_from, anchor_sizes, fg_iou_thresh, bg_iou_thresh)
    norms = _norm_layers(norm, head_norm, fpn_norm)
    pretrained = _pretrained_weights(depth, norm, norms.backbone, weights, weights_backbone)
    if trainable_layers is None:
        # torchvision's rule: fine-tune the last three stages of a pretrained backbone.
        trainable_layers = 3 if pretrained.given else 5
    backbone = _resnet_fpn_backbone(
        depth, norms, fpn_channels, p6p7_from, trainable_layers, pretrained.backbone, progress
    )
    anchor_generator = AnchorGenerator(
        _octave_anchor_sizes(anchor_sizes), (tuple(aspect_ratios),) * len(anchor_sizes)
    )
    head = FocalLossHead(
        fpn_channels,
        anchor_generator.num_anchors_per_location()[0],
        num_classes,
        norm_layer=norms.head,
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
    if pretrained.detector is not None:
        load_detector_weights(model, pretrained.detector, num_classes, progress)
    standardize_conv_weights(model)  # norm.weight_standardization=true (any of the three norms)
    return model


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
