"""Model constructors. Each takes ``norm=`` (any registry spec) and ``num_classes=``."""

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
from normlab.models.densenet import (
    DenseNet,
    densenet121,
    densenet161,
    densenet169,
    densenet201,
    densenet_bc_100,
)
from normlab.models.retinanet import (
    retinanet_resnet18_fpn,
    retinanet_resnet34_fpn,
    retinanet_resnet50_fpn,
)

__all__ = [
    "ConvNeXt",
    "DenseNet",
    "convnext_atto",
    "convnext_base",
    "convnext_femto",
    "convnext_nano",
    "convnext_pico",
    "convnext_small",
    "convnext_tiny",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "densenet_bc_100",
    "retinanet_resnet18_fpn",
    "retinanet_resnet34_fpn",
    "retinanet_resnet50_fpn",
]
