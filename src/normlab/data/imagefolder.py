"""ImageFolder trees: ``root/train/<class>/``, ``root/val/<class>/`` and optionally
``root/test/<class>/``.

The layout is checked in ``__init__`` (so ``num_classes`` / ``class_names`` are known before the
model is built, and a wrong path fails before any training starts); images are decoded lazily.
Unreadable files follow ``on_bad_sample``; see :mod:`normlab.data.bad_samples`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2
from typing_extensions import Unpack

from normlab.data.bad_samples import (
    BadSamples,
    check_header,
    check_on_bad_sample,
    convert_mode,
    guard_decoding,
    load_image,
)
from normlab.data.datamodule import ImageClassificationDataModule, LoaderOptions
from normlab.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_float_normalized
from normlab.errors import ConfigError


def rgb_loader(path: str) -> Image.Image:
    """Decode an image file as 3-channel RGB (grayscale, 16-bit, palette and RGBA files
    included); :class:`~normlab.data.bad_samples.UndecodableSampleError` naming it if it cannot."""
    return convert_mode(load_image(path), "RGB")


def find_class_folders(directory: str) -> list[str]:
    """Sorted names of the non-hidden subfolders of ``directory`` (hidden ones such as
    ``.ipynb_checkpoints`` are not classes)."""
    return sorted(
        entry.name
        for entry in os.scandir(directory)
        if entry.is_dir() and not entry.name.startswith(".")
    )


class RGBImageFolder(ImageFolder):
    """torchvision ``ImageFolder`` that always yields RGB images and ignores hidden folders."""

    def __init__(self, root: str, transform: Any = None) -> None:
        super().__init__(root, transform=transform, loader=rgb_loader)

    def sample_file(self, index: int) -> str:
        return self.samples[index][0]

    def keep_only(self, samples: list[tuple[str, int]]) -> None:
        """Read only ``samples`` (a subset of :attr:`samples`)."""
        self.samples = self.imgs = samples
        self.targets = [target for _, target in samples]

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes = find_class_folders(os.fspath(directory))
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {name: i for i, name in enumerate(classes)}


class ImageFolderDataModule(ImageClassificationDataModule):
    """Images under ``root/train/<class>/`` and ``root/val/<class>/`` (and optionally
    ``root/test/<class>/``; without it the test split is the val split).

    Train: ``RandomResizedCrop(image_size)`` + horizontal flip; eval: ``Resize(int(1.14 *
    image_size))`` + ``CenterCrop(image_size)``; ImageNet mean/std. All splits must have the same
    class folders. Every file's header is read at setup; files without a readable image header, or
    that fail to decode later, follow ``on_bad_sample`` (see :mod:`normlab.data.bad_samples`).
    """

    in_channels = 3

    def __init__(
        self,
        root: str | os.PathLike[str],
        on_bad_sample: str = "raise",
        **loader_options: Unpack[LoaderOptions],
    ) -> None:
        super().__init__(**loader_options)
        self.on_bad_sample = check_on_bad_sample(on_bad_sample)
        self.bad_samples: dict[str, BadSamples] = {}
        self.root = os.path.expanduser(os.fspath(root))
        layout = "root/train/<class>/*.png|jpg|... and root/val/<class>/... (root/test/ optional)"
        if not os.path.isdir(self.root):
            raise ConfigError(f"data.root: {self.root} is not a directory; expected {layout}")
        self.train_dir = os.path.join(self.root, "train")
        self.val_dir = os.path.join(self.root, "val")
        test_dir = os.path.join(self.root, "test")
        self.test_dir = test_dir if os.path.isdir(test_dir) else self.val_dir
        for d in (self.train_dir, self.val_dir):
            if not os.path.isdir(d):
                raise ConfigError(f"data.root: {d} not found; expected {layout}")

        split_classes = {
            d: find_class_folders(d) for d in {self.train_dir, self.val_dir, self.test_dir}
        }
        for d, names in split_classes.items():
            if not names:
                raise ConfigError(f"data.root: {d} has no class subfolders; expected {layout}")
        train_classes = split_classes[self.train_dir]
        for d in (self.val_dir, self.test_dir):
            other = split_classes[d]
            if other != train_classes:
                only_train = sorted(set(train_classes) - set(other))
                only_other = sorted(set(other) - set(train_classes))
                raise ConfigError(
                    f"data.root: class folders differ between {self.train_dir} and {d}: "
                    f"only in train: {only_train}, only in {os.path.basename(d)}: {only_other}"
                )
        if len(train_classes) < 2:
            raise ConfigError(
                f"data.root: {self.train_dir} has one class folder ({train_classes[0]}); a "
                "classifier needs at least 2 classes"
            )
        self.class_names = train_classes
        self.num_classes = len(train_classes)

    def train_transform(self) -> v2.Compose:
        if not self.augment:
            return self.eval_transform()
        return v2.Compose(
            [
                v2.ToImage(),
                v2.RandomResizedCrop(self.image_size, antialias=True),
                v2.RandomHorizontalFlip(),
                *to_float_normalized(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def eval_transform(self) -> v2.Compose:
        return v2.Compose(
            [
                v2.ToImage(),
                v2.Resize(int(self.image_size * 1.14), antialias=True),
                v2.CenterCrop(self.image_size),
                *to_float_normalized(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def _folder(self, split: str, directory: str, transform: v2.Compose) -> Dataset:
        """One split's images; files without a readable header are settled by
        ``on_bad_sample`` here, those that fail to decode when read (see :func:`guard_decoding`)."""
        try:
            folder = RGBImageFolder(directory, transform=transform)
        except FileNotFoundError as e:  # a class folder without any image file
            raise ConfigError(f"data.root: {directory}: {e}") from e
        report = BadSamples(split, directory, len(folder))
        for index, (path, _) in enumerate(folder.samples):
            check_header(report, index, path, os.path.relpath(path, directory))
        report.settle(self.on_bad_sample)
        self.bad_samples[split] = report
        folder.keep_only(report.kept(folder.samples))
        return guard_decoding(folder, split, self.on_bad_sample)

    def _build(self) -> None:
        self.train_set = self._folder("train", self.train_dir, self.train_transform())
        self.val_set = self._folder("val", self.val_dir, self.eval_transform())
        self.test_set = (
            self.val_set
            if self.test_dir == self.val_dir
            else self._folder("test", self.test_dir, self.eval_transform())
        )
