"""Paired image-to-image data in pix2pix's "aligned" format.

Layout (the one pytorch-CycleGAN-and-pix2pix's download scripts unpack, e.g. facades)::

    <root>/train/*.png|jpg      each file: domain A on the left half, domain B on the right half
    <root>/val/*.png|jpg
    <root>/test/*.png|jpg       optional: without it the test stage uses val/

Items are ``{"A": input, "B": target, "path": file}``; ``direction="BtoA"`` swaps the halves, so
``A`` is always what the generator sees and ``B`` what it should produce. Pixels are scaled to
[-1, 1], the range of a Tanh output. Broken files (not images, odd widths, undecodable) follow
``on_bad_sample``; see :mod:`normlab.data.bad_samples`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.functional import pil_to_tensor

from normlab.data.bad_samples import (
    BadSamples,
    UndecodableSampleError,
    check_header,
    check_on_bad_sample,
    convert_mode,
    guard_decoding,
    load_image,
)
from normlab.data.datamodule import SplitDataModule
from normlab.errors import ConfigError
from normlab.ranges import ArgumentError, check_int

DIRECTIONS = ("AtoB", "BtoA")
SPLITS = ("train", "val", "test")
CHANNEL_CHOICES = (1, 3)
# torchvision's ImageFolder suffixes (lower-case), as the reference accepts.
IMAGE_EXTENSIONS = IMG_EXTENSIONS
PAIR_LAYOUT = "two equal halves side by side (A on the left, B on the right)"
REASON_ODD_WIDTH = "odd width"

Item = dict[str, Any]


def list_images(directory: str) -> list[str]:
    """Image files directly inside ``directory``, sorted by name (so indices are stable)."""
    names = sorted(
        name
        for name in os.listdir(directory)
        if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")
    )
    return [os.path.join(directory, name) for name in names]


def odd_width(path: str, width: int, height: int) -> str:
    return (
        f"data.root: {path} is {width}x{height} (WxH); an aligned image must hold {PAIR_LAYOUT}, "
        "so its width must be even"
    )


def check_pair_files(report: BadSamples, paths: list[str]) -> None:
    """Add to ``report`` each file that is not an image with an even width, read from its header
    only, so that bad files are known at setup instead of mid-epoch."""
    for index, path in enumerate(paths):
        size = check_header(report, index, path, os.path.basename(path))
        if size is not None and (size[0] < 2 or size[0] % 2):
            report.add(REASON_ODD_WIDTH, os.path.basename(path), odd_width(path, *size), index)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit PIL image → float32 C×H×W in [-1, 1] (the reference's ToTensor + Normalize(0.5, 0.5))."""
    return pil_to_tensor(image).to(torch.float32).div_(127.5).sub_(1.0)


class AlignedDataset(Dataset):
    """``{"A", "B", "path"}`` items from side-by-side pair files (see the module docstring).

    ``train=True`` applies the reference's jitter: both halves resized (bicubic) to
    ``load_size``², one random ``crop_size``² window taken at the same place in both, and, with
    ``flip``, both mirrored together half of the time. ``train=False`` resizes both halves
    straight to ``crop_size``²: no randomness, so evaluation metrics are repeatable and cover the
    whole picture. Random draws use torch's generator, which Lightning and the DataLoader seed per
    worker.
    """

    def __init__(
        self,
        paths: list[str],
        *,
        direction: str = "AtoB",
        in_channels: int = 3,
        out_channels: int = 3,
        load_size: int = 286,
        crop_size: int = 256,
        flip: bool = True,
        train: bool = False,
    ) -> None:
        self.paths = list(paths)
        self.direction = direction
        # PIL modes for the input and target halves: grayscale when one channel is wanted.
        self.modes = ("L" if in_channels == 1 else "RGB", "L" if out_channels == 1 else "RGB")
        self.load_size = load_size
        self.crop_size = crop_size
        self.flip = flip
        self.train = train

    def __len__(self) -> int:
        return len(self.paths)

    def sample_file(self, index: int) -> str:
        return self.paths[index]

    def _halves(self, path: str) -> tuple[Image.Image, Image.Image]:
        """(input half, target half) of the file, ``direction`` applied, each converted to its
        mode (palette, alpha, CMYK and 16-bit files included; see :func:`convert_mode`)."""
        image = load_image(path)
        width, height = image.size
        if width < 2 or width % 2:
            # The file may have changed since setup checked it.
            raise UndecodableSampleError(odd_width(path, width, height))
        half = width // 2
        left = image.crop((0, 0, half, height))
        right = image.crop((half, 0, width, height))
        if self.direction == "BtoA":
            left, right = right, left
        return convert_mode(left, self.modes[0]), convert_mode(right, self.modes[1])

    def __getitem__(self, index: int) -> Item:
        path = self.paths[index]
        a, b = self._halves(path)
        if self.train:
            size = (self.load_size, self.load_size)
            a = a.resize(size, Image.Resampling.BICUBIC)
            b = b.resize(size, Image.Resampling.BICUBIC)
            room = self.load_size - self.crop_size
            x, y = (int(v) for v in torch.randint(0, room + 1, (2,)))
            box = (x, y, x + self.crop_size, y + self.crop_size)
            a, b = a.crop(box), b.crop(box)
            if self.flip and bool(torch.rand(()) < 0.5):
                a = a.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                b = b.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            size = (self.crop_size, self.crop_size)
            a = a.resize(size, Image.Resampling.BICUBIC)
            b = b.resize(size, Image.Resampling.BICUBIC)
        return {"A": _to_tensor(a), "B": _to_tensor(b), "path": path}


class AlignedDataModule(SplitDataModule):
    """Paired A|B images under ``root`` (layout in the module docstring) for pix2pix-style tasks.

    ``direction``: ``"AtoB"`` (input = left half) or ``"BtoA"`` (input = right half).
    ``in_channels`` / ``out_channels`` (1 or 3): channels of the input ``A`` / target ``B``; 1
    reads that half as grayscale, 3 as RGB. Known after ``__init__`` so models can be built first.
    Training items are jittered (``load_size`` → random ``crop_size`` crop, optional ``flip``);
    val/test items are resized to ``crop_size``² (see :class:`AlignedDataset`), so every item is
    ``crop_size``² (also exposed as ``image_size``).

    ``root``, ``root/train`` and ``root/val`` must exist when the module is built; each split's
    files are checked (readable, even width) from their headers when :meth:`setup` loads it.
    ``on_bad_sample``: ``raise`` (default) stops at a bad file naming it, ``skip`` leaves it out
    and logs a count (see :mod:`normlab.data.bad_samples`).
    Batches use the default collate: ``{"A": B×C×H×W, "B": B×C×H×W, "path": list[str]}``.
    """

    batch_format = "image pairs"
    # image_size is the crop's side (the size of a validation or test image too).
    image_size_option = "crop_size"

    def __init__(
        self,
        root: str | os.PathLike[str],
        direction: str = "AtoB",
        load_size: int = 286,
        crop_size: int = 256,
        flip: bool = True,
        in_channels: int = 3,
        out_channels: int = 3,
        batch_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        on_bad_sample: str = "raise",
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, seed)
        if direction not in DIRECTIONS:
            raise ArgumentError(
                "direction",
                direction,
                f"{{key}} must be one of {list(DIRECTIONS)}, got {direction!r}",
            )
        self.direction = direction
        self.crop_size = check_int("crop_size", crop_size, minimum=1)
        self.load_size = check_int("load_size", load_size, minimum=1)
        if self.load_size < self.crop_size:
            raise ArgumentError(
                "load_size",
                load_size,
                f"{{key}} ({load_size}) must be >= crop_size ({crop_size}): training crops "
                "crop_size pixels out of images resized to load_size",
            )
        if not isinstance(flip, bool):
            raise ArgumentError("flip", flip, f"{{key}} must be true or false, got {flip!r}")
        self.flip = flip
        for key, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or value not in CHANNEL_CHOICES:
                raise ArgumentError(
                    key,
                    value,
                    f"{{key}} must be one of {list(CHANNEL_CHOICES)} (grayscale or RGB), "
                    f"got {value!r}",
                )
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.image_size = self.crop_size
        self.on_bad_sample = check_on_bad_sample(on_bad_sample)
        self.bad_samples: dict[str, BadSamples] = {}
        self.root = os.path.expanduser(os.fspath(root))
        self._check_layout_early()

    # -- layout -----------------------------------------------------------------------------------

    def split_dir(self, stage: str) -> str:
        """The folder read for ``stage``; test falls back to val when ``<root>/test`` is absent."""
        path = os.path.join(self.root, stage)
        if stage == "test" and not os.path.isdir(path):
            return os.path.join(self.root, "val")
        return path

    def _require_dir(self, stage: str) -> str:
        layout = "<root>/{train,val}/ (and optionally test/) holding A|B pair images"
        if not os.path.isdir(self.root):
            raise ConfigError(f"data.root: {self.root} is not a directory; expected {layout}")
        path = self.split_dir(stage)
        if not os.path.isdir(path):
            raise ConfigError(f"data.root: {stage} folder {path} not found; expected {layout}")
        return path

    def _check_layout_early(self) -> None:
        """Fail at construction, before any model is built, when the folders are missing.
        Subclasses that create their files in :meth:`prepare_data` skip this."""
        for stage in ("train", "val"):
            self._require_dir(stage)

    # -- splits -----------------------------------------------------------------------------------

    def _dataset(self, stage: str) -> Dataset:
        directory = self._require_dir(stage)
        paths = list_images(directory)
        if not paths:
            raise ConfigError(
                f"data.root: no images ({', '.join(IMAGE_EXTENSIONS)}) in {directory}; expected "
                f"files holding {PAIR_LAYOUT}"
            )
        report = BadSamples(stage, directory, len(paths))
        check_pair_files(report, paths)
        report.settle(self.on_bad_sample)
        self.bad_samples[stage] = report
        dataset = AlignedDataset(
            report.kept(paths),
            direction=self.direction,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            load_size=self.load_size,
            crop_size=self.crop_size,
            flip=self.flip,
            train=stage == "train",
        )
        return guard_decoding(dataset, stage, self.on_bad_sample)

    # -- Lightning hooks --------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        # Only the splits a stage needs are listed and checked.
        self.setup_splits(stage, test_is_val=self.split_dir("test") == self.split_dir("val"))
