"""Data modules (LightningDataModule) for image classification, COCO-format detection and paired
image-to-image translation. What the models need (``num_classes``, ``class_names``,
``in_channels``, ``out_channels``) is known right after construction, before any file is read."""

from normlab.data.aligned import AlignedDataModule
from normlab.data.cifar import CIFARDataModule
from normlab.data.coco import CocoDetectionDataModule
from normlab.data.digit_pairs import DigitPairsDataModule
from normlab.data.digit_scenes import DigitScenesDataModule
from normlab.data.digits import DigitsDataModule
from normlab.data.fashion_mnist import FashionMNISTDataModule
from normlab.data.imagefolder import ImageFolderDataModule

__all__ = [
    "AlignedDataModule",
    "CIFARDataModule",
    "CocoDetectionDataModule",
    "DigitPairsDataModule",
    "DigitScenesDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
]
