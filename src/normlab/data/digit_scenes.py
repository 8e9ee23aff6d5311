"""Digit scenes: a small detection dataset generated from scikit-learn's 8x8 handwritten digits.

Each scene is a dark, slightly noisy canvas with a few real digits pasted at random sizes and
positions; boxes are the tight bounds of each digit's ink. The scenes are written to disk in COCO
format and read back by :class:`~normlab.data.coco.CocoDetectionDataModule`, so the embedded
default exercises exactly the loader used for real COCO data. Generation is deterministic in its
parameters (``generation_seed`` included, the training ``seed`` not) and takes a few seconds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from normlab.data.coco import CocoDetectionDataModule
from normlab.data.digits import split_indices
from normlab.data.generated import GeneratedData, atomic_folder
from normlab.ranges import ArgumentError, check_int

# Bump when the drawing code changes: the folder tag changes with it, so old scenes are not reused.
GENERATOR_VERSION = 1
SPLIT_NAMES = ("train", "val", "test")
NUM_DIGIT_CLASSES = 10
# COCO-style ids start at 1: category id d + 1 is digit d, so the id → label mapping is exercised.
DIGIT_CATEGORIES = [(d + 1, str(d)) for d in range(NUM_DIGIT_CLASSES)]
# A pixel of the upscaled digit (values in [0, 1]) counts as ink above this; it defines the box.
INK_THRESHOLD = 0.2
PLACEMENT_TRIES = 30
BRIGHTNESS_RANGE = (0.6, 1.0)


def _background(rng: np.random.Generator, ramp_x: np.ndarray, ramp_y: np.ndarray) -> np.ndarray:
    """Dark level + faint linear gradient in a random direction + mild Gaussian noise."""
    level = rng.uniform(0.0, 0.12)
    angle = rng.uniform(0.0, 2 * np.pi)
    amplitude = rng.uniform(0.0, 0.1)
    ramp = np.cos(angle) * ramp_x + np.sin(angle) * ramp_y  # in [-1, 1]
    noise = rng.normal(0.0, 0.03, size=ramp_x.shape)
    return level + amplitude * 0.5 * (ramp + 1.0) + noise


def _upscale(digit: np.ndarray, size: int) -> np.ndarray:
    """An 8x8 float digit in [0, 1] resized (bilinear) to ``size``²."""
    patch = Image.fromarray(digit.astype(np.float32)).resize(
        (size, size), Image.Resampling.BILINEAR
    )
    return np.asarray(patch, dtype=np.float32)


def render_split(
    rng: np.random.Generator,
    digits: np.ndarray,
    labels: np.ndarray,
    pool: np.ndarray,
    num_images: int,
    *,
    canvas_size: int,
    min_digits: int,
    max_digits: int,
    digit_size: tuple[int, int],
) -> tuple[list[np.ndarray], list[dict[str, Any]], list[dict[str, Any]]]:
    """``num_images`` scenes drawn from the digits ``pool`` (indices into ``digits``).

    Returns the uint8 H×W canvases and the COCO ``images`` / ``annotations`` entries (file names
    ``%06d.png``, ids from 1). A digit is placed by rejection sampling so that its square patch
    overlaps no other; after ``PLACEMENT_TRIES`` failures it is left out, so a crowded scene can
    hold fewer than ``min_digits`` (never fewer than one: the first patch always fits).
    """
    coords = np.linspace(-1.0, 1.0, canvas_size, dtype=np.float64)
    ramp_x, ramp_y = np.meshgrid(coords, coords)
    canvases: list[np.ndarray] = []
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in range(num_images):
        image_id = i + 1
        canvas = _background(rng, ramp_x, ramp_y)
        placed: list[tuple[int, int, int]] = []  # (x, y, size) of pasted patches
        for _ in range(int(rng.integers(min_digits, max_digits + 1))):
            source = int(rng.choice(pool))
            size = int(rng.integers(digit_size[0], digit_size[1] + 1))
            brightness = rng.uniform(*BRIGHTNESS_RANGE)
            spot = None
            for _ in range(PLACEMENT_TRIES):
                x, y = (int(v) for v in rng.integers(0, canvas_size - size + 1, size=2))
                if all(
                    x >= px + ps or px >= x + size or y >= py + ps or py >= y + size
                    for px, py, ps in placed
                ):
                    spot = (x, y)
                    break
            if spot is None:
                continue
            x, y = spot
            patch = _upscale(digits[source], size)
            ink_rows = np.flatnonzero((patch > INK_THRESHOLD).any(axis=1))
            ink_cols = np.flatnonzero((patch > INK_THRESHOLD).any(axis=0))
            if ink_rows.size == 0:
                continue
            region = canvas[y : y + size, x : x + size]
            np.maximum(region, brightness * patch, out=region)
            placed.append((x, y, size))
            bx, by = x + int(ink_cols[0]), y + int(ink_rows[0])
            bw, bh = int(ink_cols[-1] - ink_cols[0]) + 1, int(ink_rows[-1] - ink_rows[0]) + 1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(labels[source]) + 1,
                    "bbox": [bx, by, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                    "digit_index": source,
                }
            )
        canvases.append(np.rint(np.clip(canvas, 0.0, 1.0) * 255.0).astype(np.uint8))
        images.append(
            {
                "id": image_id,
                "file_name": f"{i:06d}.png",
                "height": canvas_size,
                "width": canvas_size,
            }
        )
    return canvases, images, annotations


def generate_digit_scenes(directory: str, params: dict[str, Any]) -> None:
    """Write the scenes described by ``params`` (see :class:`DigitScenesDataModule`) in COCO
    layout into ``directory``, which must not exist yet. Everything is written into a temporary
    sibling folder that is renamed at the end, so an interrupted run never looks complete."""
    with atomic_folder(directory, params) as tmp:
        os.makedirs(os.path.join(tmp, "annotations"))
        raw = load_digits()
        digits = np.asarray(raw.images, dtype=np.float32) / 16.0
        labels = np.asarray(raw.target, dtype=np.int64)
        pools = split_indices(labels)
        categories = [
            {"id": cat_id, "name": name, "supercategory": "digit"}
            for cat_id, name in DIGIT_CATEGORIES
        ]
        for split_number, split in enumerate(SPLIT_NAMES):
            # One stream per split: a split's scenes do not depend on the other splits' sizes.
            rng = np.random.default_rng([params["generation_seed"], split_number])
            canvases, images, annotations = render_split(
                rng,
                digits,
                labels,
                pools[split],
                params[f"num_{split}"],
                canvas_size=params["canvas_size"],
                min_digits=params["min_digits"],
                max_digits=params["max_digits"],
                digit_size=tuple(params["digit_size"]),
            )
            image_dir = os.path.join(tmp, split)
            os.makedirs(image_dir)
            for canvas, entry in zip(canvases, images, strict=True):
                rgb = np.repeat(canvas[:, :, None], 3, axis=2)
                # Fast zlib level: the noise barely compresses anyway, and level 6 is 3x slower.
                path = os.path.join(image_dir, entry["file_name"])
                Image.fromarray(rgb).save(path, compress_level=1)
            coco = {
                "info": {"description": "normlab digit scenes", "params": params},
                "images": images,
                "annotations": annotations,
                "categories": categories,
            }
            with open(os.path.join(tmp, "annotations", f"instances_{split}.json"), "w") as f:
                json.dump(coco, f)


class DigitScenesDataModule(GeneratedData, CocoDetectionDataModule):
    """Detection on generated digit scenes (10 classes, names ``"0"``..``"9"``), COCO on disk.

    The 1,797 digits of ``load_digits()`` are split into disjoint train/val/test pools
    (:func:`normlab.data.digits.split_indices`, the classification split), so val/test scenes only
    contain digit samples never seen in training. Each split has ``num_<split>`` scenes of
    ``canvas_size``² pixels with ``min_digits``..``max_digits`` digits, each upscaled to a random
    side in ``digit_size`` = ``[min, max]`` and a random brightness in 0.6–1.0; see
    :func:`render_split`. The scenes are written under
    ``<root>/digit_scenes/<tag>/`` where ``<tag>`` hashes the generation parameters, so other
    parameters never reuse or overwrite these files. Each annotation also records ``digit_index``,
    its row in ``load_digits()``.

    Files are generated by :meth:`prepare_data` (or :meth:`setup`, if missing). The loader
    arguments are those of :class:`CocoDetectionDataModule`; ``hflip`` defaults to 0 because
    digits are not mirror-invariant.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        num_train: int = 1200,
        num_val: int = 200,
        num_test: int = 300,
        canvas_size: int = 128,
        min_digits: int = 1,
        max_digits: int = 5,
        digit_size: Sequence[int] = (20, 48),
        generation_seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        train_min_sizes: Sequence[int] | int | None = None,
        max_size: int | None = None,
        hflip: float = 0.0,
        on_bad_sample: str = "raise",
        on_bad_annotation: str | None = None,
    ) -> None:
        canvas_size = check_int("canvas_size", canvas_size, minimum=16)
        min_digits = check_int("min_digits", min_digits, minimum=1)
        max_digits = check_int("max_digits", max_digits, minimum=min_digits)
        if (
            isinstance(digit_size, (str, bytes))
            or not isinstance(digit_size, Sequence)
            or len(digit_size) != 2
        ):
            raise ArgumentError(
                "digit_size", digit_size, f"{{key}} must be [min, max] pixels, got {digit_size!r}"
            )
        low = check_int("digit_size[0]", digit_size[0], minimum=4)
        high = check_int("digit_size[1]", digit_size[1], minimum=low)
        if high > canvas_size:
            raise ArgumentError(
                "digit_size[1]", high, f"{{key}}={high} must be <= canvas_size={canvas_size}"
            )
        params = {
            "version": GENERATOR_VERSION,
            "num_train": check_int("num_train", num_train, minimum=1),
            "num_val": check_int("num_val", num_val, minimum=1),
            "num_test": check_int("num_test", num_test, minimum=1),
            "canvas_size": canvas_size,
            "min_digits": min_digits,
            "max_digits": max_digits,
            "digit_size": [low, high],
            "generation_seed": check_int("generation_seed", generation_seed, minimum=0),
        }
        super().__init__(
            root=self.generated_root(root, "digit_scenes", params),
            splits={split: split for split in SPLIT_NAMES},
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            seed=seed,
            train_min_sizes=train_min_sizes,
            max_size=max_size,
            hflip=hflip,
            on_bad_sample=on_bad_sample,
            on_bad_annotation=on_bad_annotation,
        )

    def _initial_categories(self) -> list[tuple[int, str]]:
        return list(DIGIT_CATEGORIES)  # fixed: no files needed before prepare_data()

    def generate(self, directory: str, params: dict[str, Any]) -> None:
        generate_digit_scenes(directory, params)
