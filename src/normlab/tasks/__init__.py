"""LightningModules, one per task family."""

from normlab.tasks.classification import ClassificationModule
from normlab.tasks.detection import DetectionModule
from normlab.tasks.pix2pix import Pix2PixModule

__all__ = ["ClassificationModule", "DetectionModule", "Pix2PixModule"]
