"""LightningModules, one per task family."""

from normlab.tasks.classification import ClassificationModule
from normlab.tasks.detection import DetectionModule

__all__ = ["ClassificationModule", "DetectionModule"]
