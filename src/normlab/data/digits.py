"""scikit-learn's 8x8 handwritten digits (1,797 images, shipped with scikit-learn: no download).

The whole set lives in memory as one float tensor, resized once to ``image_size``; per-sample work
is an optional small affine jitter and a scalar normalisation.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset
from torchvision.transforms import v2
from typing_extensions import Unpack

from normlab.data.datamodule import ImageClassificationDataModule, LoaderOptions

# Fixed, independent of `seed`: the splits never change between runs.
SPLIT_RANDOM_STATE = 0
VAL_FRACTION = 0.15
TEST_FRACTION = 0.15


class TensorImageDataset(Dataset):
    """``(transform(images[i]) / divisor - mean) / std, labels[i]`` over in-memory
    ``(N, C, H, W)`` images (``divisor=255`` for uint8 images kept as they are stored)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: float,
        std: float,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        divisor: float = 1.0,
    ) -> None:
        self.images = images
        self.labels = labels
        self.mean = mean
        self.std = std
        self.transform = transform
        self.divisor = divisor

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.transform is not None:
            # Augment before normalising so that the affine fill value (0) is the background.
            image = self.transform(image)
        return (image.float() / self.divisor - self.mean) / self.std, self.labels[index]


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Stratified 70/15/15 train/val/test indices into ``labels``, fixed by ``SPLIT_RANDOM_STATE``."""
    n = len(labels)
    n_test = round(TEST_FRACTION * n)
    n_val = round(VAL_FRACTION * n)
    all_idx = np.arange(n)
    rest, test = train_test_split(
        all_idx, test_size=n_test, stratify=labels, random_state=SPLIT_RANDOM_STATE
    )
    train, val = train_test_split(
        rest, test_size=n_val, stratify=labels[rest], random_state=SPLIT_RANDOM_STATE
    )
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


class DigitsDataModule(ImageClassificationDataModule):
    """scikit-learn ``load_digits()`` as 1-channel ``image_size``² images, 10 classes.

    Values 0..16 are scaled to [0, 1], resized (bilinear, antialiased) once, and normalised with
    the training split's mean/std. ``augment`` adds a small ``RandomAffine`` (no flips: digits are
    not mirror-invariant). ``split_indices`` holds the row indices of each split in ``load_digits()``.
    """

    num_classes = 10
    in_channels = 1

    def __init__(
        self,
        **loader_options: Unpack[LoaderOptions],
    ) -> None:
        super().__init__(**loader_options)
        self.class_names = [str(d) for d in range(10)]
        self.split_indices: dict[str, np.ndarray] = {}
        self.mean = 0.0
        self.std = 1.0

    def _build(self) -> None:
        digits = load_digits()
        labels_np = np.asarray(digits.target, dtype=np.int64)
        images = torch.from_numpy(np.asarray(digits.images, dtype=np.float32) / 16.0).unsqueeze(1)
        if self.image_size != images.shape[-1]:
            images = F.interpolate(
                images,
                size=(self.image_size, self.image_size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        images = images.clamp_(0.0, 1.0).contiguous()
        labels = torch.from_numpy(labels_np)

        self.split_indices = split_indices(labels_np)
        train_idx = torch.from_numpy(self.split_indices["train"])
        train_images = images[train_idx]
        self.mean = float(train_images.mean())
        self.std = float(train_images.std())

        train_tf = None
        if self.augment:
            train_tf = v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))

        def subset(split: str, transform: Callable | None) -> TensorImageDataset:
            idx = torch.from_numpy(self.split_indices[split])
            return TensorImageDataset(
                images[idx].clone(), labels[idx].clone(), self.mean, self.std, transform
            )

        self.train_set = subset("train", train_tf)
        self.val_set = subset("val", None)
        self.test_set = subset("test", None)
