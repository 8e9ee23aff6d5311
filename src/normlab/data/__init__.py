"""Data modules (LightningDataModule) with ``num_classes``, ``in_channels`` and ``class_names``
known right after construction: image classification, and COCO-format detection."""

from normlab.data.coco import CocoDetectionDataModule
from normlab.data.digit_scenes import DigitScenesDataModule
from normlab.data.digits import DigitsDataModule
from normlab.data.folders import CIFARDataModule, ImageFolderDataModule

__all__ = [
    "CIFARDataModule",
    "CocoDetectionDataModule",
    "DigitScenesDataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
]
