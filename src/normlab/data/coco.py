"""Object-detection data in COCO format from a local folder.

Layout (the one the official COCO archives unpack to)::

    <root>/<split dir>/*.jpg|png                      e.g. <root>/train2017/000000000009.jpg
    <root>/annotations/instances_<split dir>.json    e.g. <root>/annotations/instances_train2017.json

The json files are parsed with the standard library; pycocotools is only needed for evaluation.
Annotations are checked once, when a split is loaded, and kept in flat numpy arrays (not one Python
object per box), so a 118k-image split costs little memory and forked loader workers share it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from normlab.data.transforms import SplitLoaders, check_int
from normlab.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_SPLITS = {"train": "train", "val": "val", "test": "test"}
STAGES = ("train", "val", "test")
BAD_ANNOTATION_POLICIES = ("error", "skip")

# Why an annotation is rejected (the keys of the per-reason counts in errors and warnings).
REASON_EMPTY_BOX = "box with width or height <= 0"
REASON_OUTSIDE = "box entirely outside its image"
REASON_CATEGORY = "category_id not in the json's categories"
REASON_IMAGE = "image_id not in the json's images"

Target = dict[str, Any]


class BadAnnotationError(ConfigError):
    """An annotation that cannot be trained or evaluated on. A ConfigError because the remedy is a
    setting (``data.on_bad_annotation=skip``), so the entry points report it as one line."""


def annotation_path(root: str, split_dir: str) -> str:
    """``<root>/annotations/instances_<split_dir>.json``."""
    return os.path.join(root, "annotations", f"instances_{split_dir}.json")


def read_json(path: str) -> dict[str, Any]:
    """The json object in ``path``; ConfigError naming the file when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.root: cannot read {path} as json ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"data.root: {path} must hold a json object, got {type(data).__name__}")
    return data


def parse_categories(data: Mapping[str, Any], path: str) -> list[tuple[int, str]]:
    """``(category id, name)`` sorted by id: the label order. ConfigError on a malformed list."""
    raw = data.get("categories")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"data.root: {path} has no 'categories' list (or it is empty)")
    categories: dict[int, str] = {}
    for i, entry in enumerate(raw):
        cat_id = entry.get("id") if isinstance(entry, dict) else None
        if isinstance(cat_id, bool) or not isinstance(cat_id, int):
            raise ConfigError(f"data.root: {path}: categories[{i}] has no integer 'id': {entry!r}")
        if cat_id in categories:
            raise ConfigError(f"data.root: {path}: category id {cat_id} appears twice")
        categories[cat_id] = str(entry.get("name", cat_id))
    return sorted(categories.items())


@dataclass(frozen=True)
class CocoSplit:
    """One split's checked annotations. Image ``i`` owns rows ``offsets[i]:offsets[i + 1]`` of the
    per-annotation arrays; boxes are absolute xyxy pixels clipped to the image, labels contiguous."""

    json_path: str
    image_dir: str
    file_names: list[str]
    image_ids: np.ndarray  # int64 [I]
    sizes: np.ndarray  # int64 [I, 2]: (height, width) from the json
    offsets: np.ndarray  # int64 [I + 1]
    boxes: np.ndarray  # float32 [M, 4]
    labels: np.ndarray  # int64 [M]
    iscrowd: np.ndarray  # int64 [M]
    area: np.ndarray  # float32 [M]
    annotation_ids: np.ndarray  # int64 [M]

    def __len__(self) -> int:
        return len(self.file_names)


def _entry_error(path: str, what: str, index: int, problem: str) -> ConfigError:
    return ConfigError(f"data.root: {path}: {what}[{index}] {problem}")


def _int_field(entry: Any, key: str, path: str, what: str, index: int) -> int:
    value = entry.get(key) if isinstance(entry, dict) else None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _entry_error(path, what, index, f"has no integer {key!r}")
    return value


def load_coco_split(
    path: str,
    image_dir: str,
    category_ids: Sequence[int],
    *,
    keep_crowd: bool,
    on_bad_annotation: str = "error",
    data: Mapping[str, Any] | None = None,
) -> CocoSplit:
    """Read and check the annotations of one split (``data``: the already parsed json, if any).

    ``category_ids[label]`` is the json category id of each contiguous label. Boxes are converted
    from xywh to xyxy and clipped to the json's image size. Bad annotations (see the ``REASON_*``
    constants) raise :class:`BadAnnotationError` or, with ``on_bad_annotation="skip"``, are dropped
    with one warning. ``keep_crowd=False`` drops ``iscrowd=1`` annotations (training ignores them;
    COCO evaluation needs them).
    """
    if data is None:
        data = read_json(path)
    label_of = {cat_id: label for label, cat_id in enumerate(category_ids)}
    known_categories = {cat_id for cat_id, _ in parse_categories(data, path)}

    images = data.get("images")
    if not isinstance(images, list):
        raise ConfigError(f"data.root: {path} has no 'images' list")
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise ConfigError(f"data.root: {path}: 'annotations' must be a list")

    file_names: list[str] = []
    image_ids: list[int] = []
    sizes: list[tuple[int, int]] = []
    row_of: dict[int, int] = {}
    for i, entry in enumerate(images):
        image_id = _int_field(entry, "id", path, "images", i)
        height = _int_field(entry, "height", path, "images", i)
        width = _int_field(entry, "width", path, "images", i)
        file_name = entry.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise _entry_error(path, "images", i, "has no 'file_name'")
        if image_id in row_of:
            raise _entry_error(path, "images", i, f"repeats image id {image_id}")
        row_of[image_id] = len(file_names)
        file_names.append(file_name)
        image_ids.append(image_id)
        sizes.append((height, width))

    per_image: list[list[tuple[int, float, float, float, float, int, int, float]]] = [
        [] for _ in file_names
    ]
    bad: list[tuple[str, Any, Any, str]] = []  # (reason, annotation id, image id, detail)
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise _entry_error(path, "annotations", i, "is not an object")
        ann_id = ann.get("id", f"#{i}")
        image_id = ann.get("image_id")
        try:
            x, y, w, h = map(float, ann["bbox"])
        except (KeyError, TypeError, ValueError):
            raise _entry_error(
                path, "annotations", i, f"(id {ann_id}) has no [x, y, w, h] 'bbox'"
            ) from None
        row = row_of.get(image_id) if isinstance(image_id, int) else None
        if row is None:
            bad.append((REASON_IMAGE, ann_id, image_id, f"image id {image_id!r} is not listed"))
            continue
        category_id = ann.get("category_id")
        if type(category_id) is not int or category_id not in known_categories:
            bad.append((REASON_CATEGORY, ann_id, image_id, f"category_id {category_id!r}"))
            continue
        if not (w > 0 and h > 0 and math.isfinite(x + y + w + h)):
            bad.append((REASON_EMPTY_BOX, ann_id, image_id, f"bbox {ann['bbox']}"))
            continue
        height, width = sizes[row]
        x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
        x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
        if x2 <= x1 or y2 <= y1:
            bad.append(
                (REASON_OUTSIDE, ann_id, image_id, f"bbox {ann['bbox']} in {width}x{height}")
            )
            continue
        crowd = int(bool(ann.get("iscrowd", 0)))
        if crowd and not keep_crowd:
            continue
        if category_id not in label_of:
            raise ConfigError(
                f"data.root: {path} uses category id {category_id} that the training json lacks"
            )
        area = ann.get("area")
        if isinstance(area, bool) or not isinstance(area, (int, float)):
            area = w * h
        numeric_id = ann_id if isinstance(ann_id, int) and not isinstance(ann_id, bool) else -1
        per_image[row].append((label_of[category_id], x1, y1, x2, y2, crowd, numeric_id, area))

    if bad:
        counts = Counter(reason for reason, *_ in bad)
        summary = ", ".join(f"{n} {reason}" for reason, n in counts.items())
        if on_bad_annotation != "skip":
            reason, ann_id, image_id, detail = bad[0]
            raise BadAnnotationError(
                f"{path}: annotation id {ann_id} (image id {image_id}): {reason} ({detail}); "
                f"{len(bad)} bad annotation(s) in this file ({summary}). Fix the file or set "
                "data.on_bad_annotation=skip to drop them"
            )
        log.warning(
            "%s: skipped %d bad annotation(s) (data.on_bad_annotation=skip): %s",
            path,
            len(bad),
            summary,
        )

    counts_per_image = [len(rows) for rows in per_image]
    offsets = np.zeros(len(per_image) + 1, dtype=np.int64)
    np.cumsum(counts_per_image, out=offsets[1:])
    flat = [row for rows in per_image for row in rows]
    table = np.asarray(flat, dtype=np.float64).reshape(len(flat), 8)
    return CocoSplit(
        json_path=path,
        image_dir=image_dir,
        file_names=file_names,
        image_ids=np.asarray(image_ids, dtype=np.int64),
        sizes=np.asarray(sizes, dtype=np.int64).reshape(-1, 2),
        offsets=offsets,
        boxes=table[:, 1:5].astype(np.float32),
        labels=table[:, 0].astype(np.int64),
        iscrowd=table[:, 5].astype(np.int64),
        area=table[:, 7].astype(np.float32),
        annotation_ids=table[:, 6].astype(np.int64),
    )


def check_image_files(split: CocoSplit) -> None:
    """Every image the json lists exists (one directory listing, not one stat per file)."""
    present = set(os.listdir(split.image_dir))
    missing = [
        name
        for name in split.file_names
        if name not in present and not os.path.isfile(os.path.join(split.image_dir, name))
    ]
    if missing:
        raise ConfigError(
            f"data.root: {len(missing)} image file(s) listed in {split.json_path} are missing "
            f"from {split.image_dir}, e.g. {', '.join(missing[:3])}"
        )


class CocoDetectionDataset(Dataset):
    """``(image, target)`` for each image of a :class:`CocoSplit`.

    ``image``: float32 3×H×W in [0, 1], RGB, not normalised (detectors normalise internally).
    ``target``: ``boxes`` float32 [N, 4] absolute xyxy, ``labels`` int64 [N], ``image_id`` int,
    ``iscrowd`` int64 [N], ``area`` float32 [N] (as in the json, i.e. original-image pixels, which
    is what COCO evaluation uses), ``orig_size`` ``(H, W)`` of the file. ``transform`` is a v2
    transform called as ``transform(image, boxes)`` so that boxes follow geometric changes.
    """

    def __init__(
        self, split: CocoSplit, transform: Callable[..., tuple[Any, Any]] | None = None
    ) -> None:
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        s = self.split
        path = os.path.join(s.image_dir, s.file_names[index])
        image = decode_image(path, mode=ImageReadMode.RGB)
        height, width = image.shape[-2:]
        json_size = tuple(int(v) for v in s.sizes[index])
        if json_size != (height, width):
            # Boxes were clipped to the json's size; a different file means misaligned boxes.
            raise ValueError(
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
        raise ConfigError(
            f"data.splits must map stages {list(STAGES)} to split folder names, got {splits!r}"
        )
    result: dict[str, str] = {}
    for stage, name in splits.items():
        if stage not in STAGES:
            raise ConfigError(f"data.splits: unknown stage {stage!r}; allowed: {list(STAGES)}")
        if name is None and stage == "test":
            continue
        if not isinstance(name, str) or not name or name != os.path.basename(name):
            raise ConfigError(
                f"data.splits.{stage} must be a folder name under data.root, got {name!r}"
            )
        result[stage] = name
    for stage in ("train", "val"):
        if stage not in result:
            raise ConfigError(f"data.splits needs a '{stage}' entry, got {dict(splits)!r}")
    return result


class CocoDetectionDataModule(SplitLoaders, pl.LightningDataModule):
    """COCO-format detection data under ``root`` (layout in the module docstring).

    ``splits`` maps the stages ``train`` / ``val`` / ``test`` to split folder names (default: the
    same names; for COCO 2017 pass ``train2017`` / ``val2017`` / ``val2017``). Without a ``test``
    entry the test split is the val split. Category ids (any ints, e.g. COCO's 1..90 with gaps)
    become contiguous labels ``0..K-1`` in id order; the train json's categories are read in
    ``__init__`` so ``num_classes`` / ``class_names`` / ``category_ids`` are known before the model
    is built, and the other splits must list the same categories.

    Training: ``iscrowd=1`` annotations are dropped, then (optionally) ``RandomShortestSize``
    (shorter side drawn from ``train_min_sizes``, longer side at most ``max_size``) and a
    horizontal flip with probability ``hflip``. Val/test images keep their original geometry (so
    detections are in the coordinates of the json) and keep crowd annotations for evaluation.
    ``on_bad_annotation``: ``"error"`` (default) or ``"skip"``; see :func:`load_coco_split`.
    Batches are ``(list of images, list of targets)`` (:func:`detection_collate`).
    """

    collate_fn = staticmethod(detection_collate)

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
        on_bad_annotation: str = "error",
    ) -> None:
        super().__init__()
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.num_workers = check_int("num_workers", num_workers, minimum=0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"data.seed must be an integer, got {seed!r}")
        self.seed = seed
        self.pin_memory = bool(pin_memory)
        self.train_min_sizes = self._check_min_sizes(train_min_sizes)
        self.max_size = None if max_size is None else check_int("max_size", max_size, minimum=1)
        if self.max_size is not None and self.train_min_sizes is None:
            raise ConfigError(
                "data.max_size only applies together with data.train_min_sizes; set both or "
                "set data.max_size=null"
            )
        if (
            isinstance(hflip, bool)
            or not isinstance(hflip, (int, float))
            or not 0.0 <= float(hflip) <= 1.0
        ):
            raise ConfigError(f"data.hflip must be a probability in [0, 1], got {hflip!r}")
        self.hflip = float(hflip)
        if on_bad_annotation not in BAD_ANNOTATION_POLICIES:
            raise ConfigError(
                f"data.on_bad_annotation must be one of {list(BAD_ANNOTATION_POLICIES)}, "
                f"got {on_bad_annotation!r}"
            )
        self.on_bad_annotation = on_bad_annotation
        self.root = os.path.expanduser(os.fspath(root))
        self.splits = _check_splits(splits)

        # Parsed json files waiting for setup() (the train json is parsed once, not twice).
        self._parsed: dict[str, dict[str, Any]] = {}
        categories = self._initial_categories()
        self.category_ids = [cat_id for cat_id, _ in categories]
        self.class_names = [name for _, name in categories]
        self.num_classes = len(categories)

        self.train_set: CocoDetectionDataset | None = None
        self.val_set: CocoDetectionDataset | None = None
        self.test_set: CocoDetectionDataset | None = None

    @staticmethod
    def _check_min_sizes(value: Sequence[int] | int | None) -> list[int] | None:
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
            raise ConfigError(
                f"data.train_min_sizes must be null or a non-empty list of integers >= 1, "
                f"got {value!r}"
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
        """Parse and check the annotations of ``stage`` (crowd kept except for ``train``)."""
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
        split = load_coco_split(
            json_path,
            image_dir,
            self.category_ids,
            keep_crowd=stage != "train",
            on_bad_annotation=self.on_bad_annotation,
            data=data,
        )
        check_image_files(split)
        return split

    def _dataset(self, stage: str) -> CocoDetectionDataset:
        transform = self.train_transform() if stage == "train" else None
        return CocoDetectionDataset(self.load_split(stage), transform)

    # -- Lightning hooks --------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        # Only the splits a stage needs are read: the COCO train json alone takes seconds to parse.
        self.setup_splits(stage, test_is_val="test" not in self.splits)
        # The train json parsed in __init__ is not kept beyond the first setup (it can be large).
        self._parsed.clear()
