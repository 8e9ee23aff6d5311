"""Model constructors. Each takes ``norm=`` (any registry spec); classifiers and detectors also
take ``num_classes=``, the pix2pix networks their input and output channels."""

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
    densenet_bc,
    densenet_bc_100,
)
from normlab.models.pix2pix import PatchDiscriminator, PixelDiscriminator, UnetGenerator
from normlab.models.retinanet import (
    DenseRetinaNet,
    retinanet_resnet18_fpn,
    retinanet_resnet34_fpn,
    retinanet_resnet50_fpn,
)

__all__ = [
    "ConvNeXt",
    "DenseNet",
    "DenseRetinaNet",
    "PatchDiscriminator",
    "PixelDiscriminator",
    "UnetGenerator",
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
    "densenet_bc",
    "densenet_bc_100",
    "retinanet_resnet18_fpn",
    "retinanet_resnet34_fpn",
    "retinanet_resnet50_fpn",
]
