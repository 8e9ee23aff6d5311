"""Tiny data sets on disk, in the formats normlab's data modules read: CIFAR's python pickles,
PNGs for image folders, A|B pairs for pix2pix and COCO folders (PNGs + instances json). The data
tests read them back; the reliability tests write them and then break them."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from normlab.data.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES


def dump_pickle(path: Path, obj: dict) -> None:
    # The official files are Python 2 pickles; torchvision reads them with encoding="latin1", which
    # turns their keys into `str` ("data", "labels", ...) -- so str keys here, as torchvision sees.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _batch(rng: np.random.Generator, n: int, num_classes: int, label_key: str, name: str) -> dict:
    batch = {
        "batch_label": name,
        "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in rng.integers(0, num_classes, size=n)],
        "filenames": [f"img_{i}.png" for i in range(n)],
    }
    if label_key == "fine_labels":
        batch["coarse_labels"] = [0] * n
    return batch


def make_cifar(root: Path, variant: str = "cifar10", per_batch: int = 4, n_test: int = 6) -> dict:
    """A tiny CIFAR-10/100 tree under ``root``; returns the batches written, by file name."""
    rng = np.random.default_rng(0)
    written: dict[str, dict] = {}
    if variant == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for i in range(1, 6):
            written[f"data_batch_{i}"] = _batch(rng, per_batch, 10, "labels", f"batch {i}")
        written["test_batch"] = _batch(rng, n_test, 10, "labels", "testing batch")
        meta = {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}
        dump_pickle(folder / "batches.meta", meta)
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        written["train"] = _batch(rng, 5 * per_batch, 100, "fine_labels", "training")
        written["test"] = _batch(rng, n_test, 100, "fine_labels", "testing")
        meta = {"fine_label_names": CIFAR100_CLASSES, "coarse_label_names": ["x"] * 20}
        dump_pickle(folder / "meta", meta)
    for name, batch in written.items():
        dump_pickle(folder / name, batch)
    return written


def write_png(path: Path, mode: str, size: tuple[int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode).save(path)


HALF = 40  # side of each square half of the fixture files
STEP = 6  # pattern value per pixel: 39 * 6 = 234 fits in a byte


def pattern_half(marker: int, shift: int = 0) -> np.ndarray:
    """HALF² RGB half whose R/G channels encode the pixel's x/y (+ ``shift``) and whose B channel
    is the constant ``marker`` (tells the halves apart)."""
    ys, xs = np.mgrid[0:HALF, 0:HALF]
    half = np.empty((HALF, HALF, 3), dtype=np.uint8)
    half[..., 0] = ((xs + shift) % HALF) * STEP
    half[..., 1] = ((ys + shift) % HALF) * STEP
    half[..., 2] = marker
    return half


def write_pair(path: Path, shift: int = 0, a_marker: int = 0, b_marker: int = 255) -> None:
    """An A|B file: both halves carry the same coordinate pattern, A marked 0 and B 255."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pair = np.concatenate([pattern_half(a_marker, shift), pattern_half(b_marker, shift)], axis=1)
    Image.fromarray(pair).save(path)


# Gapped, unsorted category ids: labels must follow id order (3 → 0, 7 → 1).
CATEGORIES = [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}]


def pixels(height: int, width: int, seed: int, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (height, width, channels) if channels > 1 else (height, width)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def write_split(
    root: Path,
    split: str,
    images: list[dict[str, Any]],
    annotations: list[dict[str, Any]],
    categories: list[dict[str, Any]] = CATEGORIES,
) -> None:
    """Write ``images`` (entries with ``id``, ``height``, ``width`` and optionally ``gray``) as
    PNGs under ``root/split`` and their COCO json under ``root/annotations``."""
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    entries = []
    for image in images:
        name = f"{image['id']:04d}.png"
        channels = 1 if image.get("gray") else 3
        array = pixels(image["height"], image["width"], image["id"], channels)
        Image.fromarray(array).save(root / split / name)
        entries.append(
            {
                "id": image["id"],
                "file_name": name,
                "height": image["height"],
                "width": image["width"],
            }
        )
    for i, ann in enumerate(annotations):
        ann.setdefault("id", 100 + i)
        ann.setdefault("iscrowd", 0)
    data = {"images": entries, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


def ann(image_id: int, category_id: int, bbox: list[float], **extra: Any) -> dict[str, Any]:
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}
