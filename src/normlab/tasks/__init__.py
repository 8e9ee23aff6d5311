"""LightningModules, one per task family."""

from normlab.tasks.classification import ClassificationModule

__all__ = ["ClassificationModule"]
