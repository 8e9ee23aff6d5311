"""Image transforms of the CIFAR and ImageFolder modules: normalisation, and a view of a dataset
with its own transform, so one decoded copy of a training set serves both the augmented train
split and the clean val split."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_float_normalized(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    """uint8/float image → float32 in [0, 1] → normalised with ``mean``/``std``."""
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


class TransformSubset(Dataset):
    """``dataset[indices[i]]`` with ``transform`` applied to the image (targets untouched)."""

    def __init__(
        self,
        dataset: Dataset,
        indices: Sequence[int] | torch.Tensor,
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, target = self.dataset[self.indices[index]]
        if self.transform is not None:
            image = self.transform(image)
        return image, target
