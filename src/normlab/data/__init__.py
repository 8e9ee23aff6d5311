"""Image-classification data modules (LightningDataModule) with ``num_classes``, ``in_channels``
and ``class_names`` known right after construction."""

from normlab.data.digits import DigitsDataModule
from normlab.data.folders import CIFARDataModule, ImageFolderDataModule

__all__ = ["CIFARDataModule", "DigitsDataModule", "ImageFolderDataModule"]
