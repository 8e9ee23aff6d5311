"""Reading and checking COCO-format annotations (``instances_<split>.json``).

The json files are parsed with the standard library; pycocotools is only needed for evaluation.
:func:`load_coco_split` checks one split's annotations and image headers once and keeps them in
flat numpy arrays (:class:`CocoSplit`, not one Python object per box), so a 118k-image split costs
little memory and forked loader workers share it. A malformed json stops with a
:class:`~normlab.errors.ConfigError` naming the entry; bad images and annotations (a missing file,
an empty box, an unknown category) follow ``on_bad_sample`` (:mod:`normlab.data.bad_samples`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from normlab.data.bad_samples import BadSamples, check_header, listing
from normlab.errors import ConfigError
from normlab.ranges import is_int, is_number

log = logging.getLogger(__name__)

# Why an annotation or image is rejected (the keys of the per-reason counts in errors and logs).
REASON_EMPTY_BOX = "box with width or height <= 0"
REASON_OUTSIDE = "box entirely outside its image"
REASON_CATEGORY = "category_id not in the json's categories"
REASON_IMAGE = "image_id not in the json's images"
REASON_SIZE = "image size differs from the json"

# One kept annotation: label, x1, y1, x2, y2, iscrowd, annotation id, area.
AnnotationRow = tuple[int, float, float, float, float, int, int, float]


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
        if not is_int(cat_id):
            raise ConfigError(f"data.root: {path}: categories[{i}] has no integer 'id': {entry!r}")
        if cat_id in categories:
            raise ConfigError(f"data.root: {path}: category id {cat_id} appears twice")
        categories[cat_id] = str(entry.get("name", cat_id))
    return sorted(categories.items())


@dataclass(frozen=True)
class CocoSplit:
    """One split's checked annotations. Image ``i`` owns rows ``offsets[i]:offsets[i + 1]`` of the
    per-annotation arrays; boxes are absolute xyxy pixels (clipped to the image for training, as
    the json has them for evaluation), labels contiguous."""

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


@dataclass
class _ImageList:
    """The json's ``images`` entries, in file order; ``row_of`` maps an image id to its row."""

    file_names: list[str]
    image_ids: list[int]
    sizes: list[tuple[int, int]]  # (height, width)
    row_of: dict[int, int]


def _entry_error(path: str, what: str, index: int, problem: str) -> ConfigError:
    return ConfigError(f"data.root: {path}: {what}[{index}] {problem}")


def _int_field(entry: Any, key: str, path: str, what: str, index: int) -> int:
    value = entry.get(key) if isinstance(entry, dict) else None
    if not is_int(value):
        raise _entry_error(path, what, index, f"has no integer {key!r}")
    return value


def _clip(
    x: float, y: float, w: float, h: float, width: int, height: int
) -> tuple[float, float, float, float]:
    """xywh box as xyxy clipped to a ``width`` x ``height`` image."""
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    return x1, y1, x2, y2


def _read_images(entries: list[Any], path: str) -> _ImageList:
    """The ``images`` list; ConfigError naming the first malformed or repeated entry."""
    images = _ImageList([], [], [], {})
    for i, entry in enumerate(entries):
        image_id = _int_field(entry, "id", path, "images", i)
        height = _int_field(entry, "height", path, "images", i)
        width = _int_field(entry, "width", path, "images", i)
        file_name = entry.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise _entry_error(path, "images", i, "has no 'file_name'")
        if image_id in images.row_of:
            raise _entry_error(path, "images", i, f"repeats image id {image_id}")
        images.row_of[image_id] = len(images.file_names)
        images.file_names.append(file_name)
        images.image_ids.append(image_id)
        images.sizes.append((height, width))
    return images


def _read_box(ann: Any, index: int, path: str) -> tuple[float, float, float, float]:
    """An annotation's ``[x, y, w, h]``; ConfigError when it is not an object with one."""
    if not isinstance(ann, dict):
        raise _entry_error(path, "annotations", index, "is not an object")
    try:
        x, y, w, h = map(float, ann["bbox"])
    except (KeyError, TypeError, ValueError):
        ann_id = ann.get("id", f"#{index}")
        raise _entry_error(
            path, "annotations", index, f"(id {ann_id}) has no [x, y, w, h] 'bbox'"
        ) from None
    return x, y, w, h


def _annotation_problem(
    ann: dict[str, Any],
    row: int | None,
    known_categories: set[int],
    box: tuple[float, float, float, float],
    clipped: tuple[float, float, float, float],
    size: tuple[int, int],
) -> tuple[str, str] | None:
    """``(reason, detail)`` if the annotation cannot be used (the ``REASON_*`` constants)."""
    x, y, w, h = box
    x1, y1, x2, y2 = clipped
    height, width = size
    category_id = ann.get("category_id")
    if row is None:
        return REASON_IMAGE, f"image id {ann.get('image_id')!r} is not listed"
    if type(category_id) is not int or category_id not in known_categories:
        return REASON_CATEGORY, f"category_id {category_id!r}"
    if not (w > 0 and h > 0 and math.isfinite(x + y + w + h)):
        return REASON_EMPTY_BOX, f"bbox {ann['bbox']}"
    if x2 <= x1 or y2 <= y1:
        return REASON_OUTSIDE, f"bbox {ann['bbox']} in {width}x{height}"
    return None


def _read_annotations(
    annotations: list[Any],
    images: _ImageList,
    path: str,
    *,
    known_categories: set[int],
    label_of: Mapping[int, int],
    report: BadSamples,
    keep_crowd: bool,
    clip_to_image: bool,
) -> tuple[list[list[AnnotationRow]], list[str]]:
    """Each image's usable annotations, and the ids of the boxes clipped to their image. An
    unusable annotation is added to ``report`` against its image."""
    per_image: list[list[AnnotationRow]] = [[] for _ in images.file_names]
    clipped_ids: list[str] = []
    for i, ann in enumerate(annotations):
        x, y, w, h = _read_box(ann, i, path)
        ann_id = ann.get("id", f"#{i}")
        image_id = ann.get("image_id")
        row = images.row_of.get(image_id) if isinstance(image_id, int) else None
        size = images.sizes[row] if row is not None else (0, 0)
        x1, y1, x2, y2 = _clip(x, y, w, h, size[1], size[0])
        problem = _annotation_problem(
            ann, row, known_categories, (x, y, w, h), (x1, y1, x2, y2), size
        )
        if problem is not None:
            reason, detail = problem
            where = f"{path}: annotation id {ann_id} (image id {image_id})"
            report.add(reason, f"annotation {ann_id}", f"{where}: {reason} ({detail})", row)
            continue
        assert row is not None  # an unlisted image is a problem above
        crowd = int(bool(ann.get("iscrowd", 0)))
        if crowd and not keep_crowd:
            continue
        if not clip_to_image:
            x1, y1, x2, y2 = x, y, x + w, y + h
        elif (x1, y1, x2, y2) != (x, y, x + w, y + h):
            clipped_ids.append(str(ann_id))
        category_id = ann["category_id"]
        if category_id not in label_of:
            raise ConfigError(
                f"data.root: {path} uses category id {category_id} that the training json lacks"
            )
        area = ann.get("area")
        if not is_number(area):
            area = w * h
        numeric_id = ann_id if is_int(ann_id) else -1
        per_image[row].append((label_of[category_id], x1, y1, x2, y2, crowd, numeric_id, area))
    return per_image, clipped_ids


def _check_image_files(report: BadSamples, images: _ImageList, image_dir: str, path: str) -> None:
    """Add to ``report`` each image whose file is missing, unreadable or of another size than
    the json says (its boxes would be misplaced)."""
    for row, name in enumerate(images.file_names):
        file = os.path.join(image_dir, name)
        size = check_header(report, row, file, name)
        height, width = images.sizes[row]
        if size is not None and size != (width, height):
            detail = (
                f"{file} is {size[0]}x{size[1]} (WxH) but {path} says {width}x{height} for image "
                f"id {images.image_ids[row]}: its boxes would be misplaced"
            )
            report.add(REASON_SIZE, name, detail, row)


def _packed(
    path: str,
    image_dir: str,
    images: _ImageList,
    per_image: list[list[AnnotationRow]],
    kept: list[int],
) -> CocoSplit:
    """The ``kept`` images and their annotations as flat arrays."""
    rows_kept = [per_image[row] for row in kept]
    offsets = np.zeros(len(kept) + 1, dtype=np.int64)
    np.cumsum([len(rows) for rows in rows_kept], out=offsets[1:])
    flat = [entry for rows in rows_kept for entry in rows]
    table = np.asarray(flat, dtype=np.float64).reshape(len(flat), 8)
    return CocoSplit(
        json_path=path,
        image_dir=image_dir,
        file_names=[images.file_names[row] for row in kept],
        image_ids=np.asarray([images.image_ids[row] for row in kept], dtype=np.int64),
        sizes=np.asarray([images.sizes[row] for row in kept], dtype=np.int64).reshape(-1, 2),
        offsets=offsets,
        boxes=table[:, 1:5].astype(np.float32),
        labels=table[:, 0].astype(np.int64),
        iscrowd=table[:, 5].astype(np.int64),
        area=table[:, 7].astype(np.float32),
        annotation_ids=table[:, 6].astype(np.int64),
    )


def load_coco_split(
    path: str,
    image_dir: str,
    category_ids: Sequence[int],
    *,
    split: str,
    keep_crowd: bool,
    clip_to_image: bool = True,
    on_bad_sample: str = "raise",
    data: Mapping[str, Any] | None = None,
) -> tuple[CocoSplit, BadSamples]:
    """Read and check the annotations and image files of one split (``data``: the already parsed
    json, if any); returns the good images and the report of the bad ones.

    ``category_ids[label]`` is the json category id of each contiguous label. Boxes are converted
    from xywh to xyxy; ``clip_to_image`` clips them to the json's image size (counted in one log
    line), which training may want, while COCO evaluation scores the boxes, areas and crowd flags
    as the json has them, so evaluation splits must not clip. An image is
    bad when its file is missing, is not an image, or has another size than the json says, or when
    one of its annotations is (see the ``REASON_*`` constants): with ``on_bad_sample="skip"`` it
    is left out, since keeping it without the bad box would show that object as background to
    the detector and to the evaluation. ``keep_crowd=False`` drops ``iscrowd=1`` annotations
    (training ignores them; COCO evaluation needs them).
    """
    if data is None:
        data = read_json(path)
    label_of = {cat_id: label for label, cat_id in enumerate(category_ids)}
    known_categories = {cat_id for cat_id, _ in parse_categories(data, path)}

    image_entries = data.get("images")
    if not isinstance(image_entries, list):
        raise ConfigError(f"data.root: {path} has no 'images' list")
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise ConfigError(f"data.root: {path}: 'annotations' must be a list")

    images = _read_images(image_entries, path)
    report = BadSamples(split, path, len(images.file_names))
    per_image, clipped_ids = _read_annotations(
        annotations,
        images,
        path,
        known_categories=known_categories,
        label_of=label_of,
        report=report,
        keep_crowd=keep_crowd,
        clip_to_image=clip_to_image,
    )
    _check_image_files(report, images, image_dir, path)
    report.settle(on_bad_sample)
    if clipped_ids:
        log.info(
            "data: clipped %d %s boxes that reach outside their image to it (%s): annotations %s",
            len(clipped_ids),
            split,
            path,
            listing(clipped_ids),
        )
    kept = report.kept(range(len(images.file_names)))
    return _packed(path, image_dir, images, per_image, kept), report
