"""Object-detection data in COCO format from a local folder: the dataset and its data module.

Layout (the one the official COCO archives unpack to)::

    <root>/<split dir>/*.jpg|png                      e.g. <root>/train2017/000000000009.jpg
    <root>/annotations/instances_<split dir>.json    e.g. <root>/annotations/instances_train2017.json

Reading and checking the json files is :mod:`normlab.data.coco_format`'s part. Broken samples
follow ``on_bad_sample``; see :mod:`normlab.data.bad_samples`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from normlab.data.bad_samples import (
    BadSamples,
    UndecodableSampleError,
    check_on_bad_sample,
    guard_decoding,
    undecodable,
)
from normlab.data.coco_format import (
    CocoSplit,
    annotation_path,
    load_coco_split,
    parse_categories,
    read_json,
)
from normlab.data.datamodule import SplitDataModule
from normlab.errors import ConfigError
from normlab.ranges import ArgumentError, check_int, is_int, is_number

log = logging.getLogger(__name__)

DEFAULT_SPLITS = {"train": "train", "val": "val", "test": "test"}
STAGES = ("train", "val", "test")
# The deprecated data.on_bad_annotation's values and their data.on_bad_sample equivalents.
LEGACY_POLICIES = {"error": "raise", "skip": "skip"}

Target = dict[str, Any]


class CocoDetectionDataset(Dataset):
    """``(image, target)`` for each image of a :class:`CocoSplit`.

    ``image``: float32 3×H×W in [0, 1], RGB, not normalised (detectors normalise internally).
    ``target``: ``boxes`` float32 [N, 4] absolute xyxy, ``labels`` int64 [N], ``image_id`` int,
    ``iscrowd`` int64 [N], ``area`` float32 [N] (as in the json, i.e. original-image pixels, which
    is what COCO evaluation uses), ``orig_size`` ``(H, W)`` of the file. ``transform`` is a v2
    transform called as ``transform(image, boxes)`` so that boxes follow geometric changes.
    Grayscale, palette and alpha files are read as RGB, 16-bit ones scaled to 8 bits; a file that
    does not decode raises :class:`~normlab.data.bad_samples.UndecodableSampleError` naming it.
    """

    def __init__(
        self, split: CocoSplit, transform: Callable[..., tuple[Any, Any]] | None = None
    ) -> None:
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def sample_file(self, index: int) -> str:
        return os.path.join(self.split.image_dir, self.split.file_names[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        s = self.split
        path = self.sample_file(index)
        try:
            image = decode_image(path, mode=ImageReadMode.RGB)
        except (RuntimeError, OSError) as error:  # torchvision reports corrupt data as RuntimeError
            raise undecodable(path, error) from error
        # 16-bit PNGs decode as uint16, which not every v2 transform takes.
        image = v2.functional.to_dtype(image, torch.uint8, scale=True)
        height, width = image.shape[-2:]
        json_size = tuple(int(v) for v in s.sizes[index])
        if json_size != (height, width):
            # Setup checked the header; a file that changed since would misplace its boxes.
            raise UndecodableSampleError(
                f"{path} is {height}x{width} (HxW) but {s.json_path} says {json_size[0]}x"
                f"{json_size[1]} for image id {int(s.image_ids[index])}"
            )
        lo, hi = int(s.offsets[index]), int(s.offsets[index + 1])
        boxes = tv_tensors.BoundingBoxes(
            torch.from_numpy(s.boxes[lo:hi].copy()), format="XYXY", canvas_size=(height, width)
        )
        image = tv_tensors.Image(image)
        if self.transform is not None:
            image, boxes = self.transform(image, boxes)
        target: Target = {
            "boxes": boxes.as_subclass(torch.Tensor).to(torch.float32),
            "labels": torch.from_numpy(s.labels[lo:hi].copy()),
            "image_id": int(s.image_ids[index]),
            "iscrowd": torch.from_numpy(s.iscrowd[lo:hi].copy()),
            "area": torch.from_numpy(s.area[lo:hi].copy()),
            "orig_size": (int(height), int(width)),
        }
        pixels = v2.functional.to_dtype(image.as_subclass(torch.Tensor), torch.float32, scale=True)
        return pixels, target


def detection_collate(
    batch: Sequence[tuple[torch.Tensor, Target]],
) -> tuple[list[torch.Tensor], list[Target]]:
    """``(images, targets)`` as two lists: detection images differ in size, so nothing is stacked."""
    return [image for image, _ in batch], [target for _, target in batch]


def _check_splits(splits: Mapping[str, Any] | None) -> dict[str, str]:
    if splits is None:
        return dict(DEFAULT_SPLITS)
    if not isinstance(splits, Mapping):
        raise ArgumentError(
            "splits",
            splits,
            f"{{key}} must map stages {list(STAGES)} to split folder names, got {splits!r}",
        )
    result: dict[str, str] = {}
    for stage, name in splits.items():
        if stage not in STAGES:
            raise ArgumentError(
                "splits", splits, f"{{key}}: unknown stage {stage!r}; allowed: {list(STAGES)}"
            )
        if name is None and stage == "test":
            continue
        if not isinstance(name, str) or not name or name != os.path.basename(name):
            raise ArgumentError(
                f"splits.{stage}", name, f"{{key}} must be a folder name under root, got {name!r}"
            )
        result[stage] = name
    for stage in ("train", "val"):
        if stage not in result:
            raise ArgumentError(
                "splits", splits, f"{{key}} needs a '{stage}' entry, got {dict(splits)!r}"
            )
    return result


class CocoDetectionDataModule(SplitDataModule):
    """COCO-format detection data under ``root`` (layout in the module docstring).

    ``splits`` maps the stages ``train`` / ``val`` / ``test`` to split folder names (default: the
    same names; for COCO 2017 pass ``train2017`` / ``val2017`` / ``val2017``). Without a ``test``
    entry the test split is the val split. Category ids (any ints, e.g. COCO's 1..90 with gaps)
    become contiguous labels ``0..K-1`` in id order; the train json's categories are read in
    ``__init__`` so ``num_classes`` / ``class_names`` / ``category_ids`` are known before the model
    is built, and the other splits must list the same categories.

    Training: boxes are clipped to their image, ``iscrowd=1`` annotations are dropped, then
    (optionally) ``RandomShortestSize`` (shorter side drawn from ``train_min_sizes``, longer side
    at most ``max_size``) and a horizontal flip with probability ``hflip``. Val/test images keep
    their original geometry (so detections are in the coordinates of the json) and their
    annotations as the json has them (crowd regions, boxes reaching past the image edge) for
    COCO evaluation.
    ``on_bad_sample``: ``"raise"`` (default) stops at the first bad image or annotation naming it,
    ``"skip"`` leaves out the images concerned with a count (see :func:`load_coco_split` and
    :mod:`normlab.data.bad_samples`). ``on_bad_annotation`` (``"error"`` / ``"skip"``) is its
    deprecated former name, still read so that checkpoints saved with it can be evaluated.
    Batches are ``(list of images, list of targets)`` (:func:`detection_collate`).
    """

    collate_fn = staticmethod(detection_collate)
    batch_format = "images with boxes"

    in_channels = 3

    def __init__(
        self,
        root: str | os.PathLike[str],
        splits: Mapping[str, str] | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        train_min_sizes: Sequence[int] | int | None = None,
        max_size: int | None = None,
        hflip: float = 0.5,
        on_bad_sample: str = "raise",
        on_bad_annotation: str | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, seed)
        self.train_min_sizes = self._check_min_sizes(train_min_sizes)
        self.max_size = None if max_size is None else check_int("max_size", max_size, minimum=1)
        if self.max_size is not None and self.train_min_sizes is None:
            raise ArgumentError(
                "max_size",
                max_size,
                "{key} only applies together with train_min_sizes; set both or set {key}=null",
            )
        if not (is_number(hflip) and 0.0 <= hflip <= 1.0):
            raise ArgumentError(
                "hflip", hflip, f"{{key}} must be a probability in [0, 1], got {hflip!r}"
            )
        self.hflip = float(hflip)
        self.on_bad_sample = self._check_policy(on_bad_sample, on_bad_annotation)
        self.bad_samples: dict[str, BadSamples] = {}
        self.root = os.path.expanduser(os.fspath(root))
        self.splits = _check_splits(splits)

        # Parsed json files waiting for setup() (the train json is parsed once, not twice).
        self._parsed: dict[str, dict[str, Any]] = {}
        categories = self._initial_categories()
        self.category_ids = [cat_id for cat_id, _ in categories]
        self.class_names = [name for _, name in categories]
        self.num_classes = len(categories)

    @staticmethod
    def _check_policy(on_bad_sample: Any, on_bad_annotation: Any) -> str:
        """``on_bad_sample``, or what the deprecated ``on_bad_annotation`` maps to when given."""
        policy = check_on_bad_sample(on_bad_sample)
        if on_bad_annotation is None:
            return policy
        if on_bad_annotation not in LEGACY_POLICIES:
            raise ArgumentError(
                "on_bad_annotation",
                on_bad_annotation,
                f"{{key}} (deprecated, use on_bad_sample) must be one of "
                f"{list(LEGACY_POLICIES)}, got {on_bad_annotation!r}",
            )
        legacy = LEGACY_POLICIES[on_bad_annotation]
        if policy not in ("raise", legacy):  # "raise" is also what an unset on_bad_sample reads
            raise ArgumentError(
                "on_bad_annotation",
                on_bad_annotation,
                f"{{key}}={on_bad_annotation} contradicts on_bad_sample={policy}; drop the "
                "deprecated {key}",
            )
        log.warning("on_bad_annotation is deprecated; use on_bad_sample=%s", legacy)
        return legacy

    @staticmethod
    def _check_min_sizes(value: Sequence[int] | int | None) -> list[int] | None:
        if value is None:
            return None
        if is_int(value):
            value = [value]
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
            raise ArgumentError(
                "train_min_sizes",
                value,
                f"{{key}} must be null or a non-empty list of integers >= 1, got {value!r}",
            )
        return [check_int("train_min_sizes", v, minimum=1) for v in value]

    # -- layout -----------------------------------------------------------------------------------

    def split_paths(self, stage: str) -> tuple[str, str]:
        """``(image dir, annotation json)`` of ``stage`` (test falls back to val)."""
        name = self.splits.get(stage) or self.splits["val"]
        return os.path.join(self.root, name), annotation_path(self.root, name)

    def _check_layout(self) -> None:
        layout = "<root>/<split>/ images and <root>/annotations/instances_<split>.json"
        if not os.path.isdir(self.root):
            raise ConfigError(f"data.root: {self.root} is not a directory; expected {layout}")
        for stage in self.splits:
            image_dir, json_path = self.split_paths(stage)
            key = f"data.root / data.splits.{stage}={self.splits[stage]!r}"
            if not os.path.isdir(image_dir):
                raise ConfigError(f"{key}: image folder {image_dir} not found; expected {layout}")
            if not os.path.isfile(json_path):
                raise ConfigError(
                    f"{key}: annotation file {json_path} not found; expected {layout}"
                )

    def _initial_categories(self) -> list[tuple[int, str]]:
        """``(category id, name)`` in label order, known before :meth:`setup` (subclasses with a
        fixed label set override this and need no files yet)."""
        self._check_layout()
        _, json_path = self.split_paths("train")
        data = read_json(json_path)
        self._parsed[json_path] = data
        return parse_categories(data, json_path)

    # -- transforms -------------------------------------------------------------------------------

    def train_transform(self) -> v2.Compose | None:
        """Geometric training augmentation applied to image and boxes together (None: none)."""
        steps: list[v2.Transform] = []
        if self.train_min_sizes is not None:
            steps.append(v2.RandomShortestSize(self.train_min_sizes, max_size=self.max_size))
        if self.hflip > 0:
            steps.append(v2.RandomHorizontalFlip(p=self.hflip))
        return v2.Compose(steps) if steps else None

    # -- splits -----------------------------------------------------------------------------------

    def load_split(self, stage: str) -> CocoSplit:
        """Parse and check the annotations and image files of ``stage`` (crowd kept except for
        ``train``); bad images are settled by ``on_bad_sample``."""
        image_dir, json_path = self.split_paths(stage)
        for path, is_dir in ((image_dir, True), (json_path, False)):
            if not (os.path.isdir(path) if is_dir else os.path.isfile(path)):
                raise ConfigError(
                    f"data.root / data.splits.{stage}: {path} not found (needed by setup)"
                )
        data = self._parsed.pop(json_path, None) or read_json(json_path)
        expected = list(zip(self.category_ids, self.class_names, strict=True))
        found = parse_categories(data, json_path)
        if found != expected:
            train_json = self.split_paths("train")[1]
            raise ConfigError(
                f"data.root: {json_path} lists categories {found} but {train_json} lists "
                f"{expected}; every split must use the same categories"
            )
        split, report = load_coco_split(
            json_path,
            image_dir,
            self.category_ids,
            split=stage,
            keep_crowd=stage != "train",
            clip_to_image=stage == "train",
            on_bad_sample=self.on_bad_sample,
            data=data,
        )
        self.bad_samples[stage] = report
        return split

    def _dataset(self, stage: str) -> Dataset:
        transform = self.train_transform() if stage == "train" else None
        dataset = CocoDetectionDataset(self.load_split(stage), transform)
        return guard_decoding(dataset, stage, self.on_bad_sample)

    # -- Lightning hooks --------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        # Only the splits a stage needs are read: the COCO train json alone takes seconds to parse.
        self.setup_splits(stage, test_is_val="test" not in self.splits)
        # The train json parsed in __init__ is not kept beyond the first setup (it can be large).
        self._parsed.clear()
