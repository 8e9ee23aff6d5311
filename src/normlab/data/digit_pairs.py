"""Digit pairs: an edges → digit translation dataset generated from scikit-learn's 8x8 digits.

Each pair is one real handwritten digit, upscaled (bilinear) to a random size and position on a
black ``image_size``² canvas with a random stroke brightness (B), next to a binary outline of its
strokes (A): the morphological gradient of the thresholded upscaled digit, a closed 2-px contour.
A generator has to fill the outline in, restore the soft stroke profile and guess the brightness. The pairs are written as aligned A|B PNGs and read
back by :class:`~normlab.data.aligned.AlignedDataModule`, so the embedded default exercises the
same loader as real pix2pix data. Generation is deterministic in its parameters
(``generation_seed`` included, the training ``seed`` not) and takes about a second.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from normlab.data.aligned import SPLITS, AlignedDataModule
from normlab.data.digits import split_indices
from normlab.data.generated import GeneratedData, atomic_folder
from normlab.ranges import ArgumentError, check_int

# Bump when the drawing code changes: the folder tag changes with it, so old pairs are not reused.
GENERATOR_VERSION = 2
# Side of the pasted digit (its 8x8 pixels plus a blank 1-px border) as a fraction of the
# canvas, and its stroke brightness.
SCALE_RANGE = (0.6, 1.0)
BRIGHTNESS_RANGE = (0.55, 1.0)
# Upscaled ink (in [0, 1], before brightness) above this is stroke; A outlines the strokes.
INK_THRESHOLD = 0.4
# Per-split record of which load_digits() row each file shows; written before the marker.
MANIFEST = "manifest.json"


@lru_cache(maxsize=1)
def _pool_sizes() -> tuple[tuple[str, int], ...]:
    labels = np.asarray(load_digits().target, dtype=np.int64)
    return tuple((split, len(pool)) for split, pool in split_indices(labels).items())


def pool_sizes() -> dict[str, int]:
    """Digits available to each split (the disjoint pools of :func:`split_indices`); cached, as
    every module construction needs them to resolve ``num_<split>``."""
    return dict(_pool_sizes())


def outline(ink: np.ndarray, threshold: float = INK_THRESHOLD) -> np.ndarray:
    """Closed 2-px contour (bool H×W) of the strokes of ``ink`` (float, brightness not applied):
    the morphological gradient (3x3 dilation minus 3x3 erosion) of ``ink > threshold``."""
    mask = ink > threshold
    height, width = mask.shape
    padded = np.pad(mask, 1)
    grown = np.zeros_like(mask)
    shrunk = np.ones_like(mask)
    for dy in range(3):
        for dx in range(3):
            shifted = padded[dy : dy + height, dx : dx + width]
            grown |= shifted
            shrunk &= shifted
    return grown & ~shrunk


def render_pair(
    rng: np.random.Generator, digit: np.ndarray, image_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(A outline, B digit) as uint8 ``image_size``² arrays for one 8x8 ``digit`` in [0, 1].

    The outline is drawn at the digit's stroke brightness: a binary outline would leave the
    brightness (uniform in BRIGHTNESS_RANGE) impossible to infer, an error floor of ~0.04 in L1 on
    the [-1, 1] scale that no generator can go below (measured: validation L1 stalled at 0.050).
    """
    low, high = (max(8, round(f * image_size)) for f in SCALE_RANGE)
    side = int(rng.integers(low, min(high, image_size) + 1))
    x, y = (int(v) for v in rng.integers(0, image_size - side + 1, size=2))
    brightness = rng.uniform(*BRIGHTNESS_RANGE)
    # A blank border around the 8x8 digit: many digits touch their box, and without it the patch
    # would end in a hard step that reads as a stroke edge.
    padded = np.pad(digit.astype(np.float32), 1)
    patch = Image.fromarray(padded).resize((side, side), Image.Resampling.BILINEAR)
    ink = np.zeros((image_size, image_size), dtype=np.float32)
    ink[y : y + side, x : x + side] = np.clip(np.asarray(patch, dtype=np.float32), 0.0, 1.0)
    target = np.rint(ink * (brightness * 255.0)).astype(np.uint8)
    edges = np.where(outline(ink), np.rint(brightness * 255.0), 0).astype(np.uint8)
    return edges, target


def generate_digit_pairs(directory: str, params: dict[str, Any]) -> None:
    """Write the pairs described by ``params`` (see :class:`DigitPairsDataModule`) into
    ``directory`` (which must not exist yet) as ``<split>/<n>_d<row>.png`` grayscale A|B files,
    plus :data:`MANIFEST` and :data:`COMPLETE_MARKER`. Everything goes into a temporary sibling
    folder renamed at the end, so an interrupted run never looks complete."""
    with atomic_folder(directory, params) as tmp:
        raw = load_digits()
        digits = np.asarray(raw.images, dtype=np.float32) / 16.0
        labels = np.asarray(raw.target, dtype=np.int64)
        pools = split_indices(labels)
        size = params["image_size"]
        manifest: dict[str, list[dict[str, Any]]] = {}
        for split_number, split in enumerate(SPLITS):
            # One stream per split: a split's pairs do not depend on the other splits' sizes.
            rng = np.random.default_rng([params["generation_seed"], split_number])
            # A seeded subset (in a shuffled order) when fewer pairs than pool digits are asked.
            chosen = rng.permutation(pools[split])[: params[f"num_{split}"]]
            split_dir = os.path.join(tmp, split)
            os.makedirs(split_dir)
            entries = []
            for n, row in enumerate(chosen.tolist()):
                outline, digit = render_pair(rng, digits[row], size)
                name = f"{n:05d}_d{row:04d}.png"
                pair = np.concatenate([outline, digit], axis=1)
                # Fast zlib level: these files are tiny, and the default level is several x slower.
                Image.fromarray(pair).save(os.path.join(split_dir, name), compress_level=1)
                entries.append({"file": name, "digit_index": row, "label": int(labels[row])})
            manifest[split] = entries
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f)


class DigitPairsDataModule(GeneratedData, AlignedDataModule):
    """Outline → digit translation on generated 1-channel pairs (no download).

    The 1,797 digits of ``load_digits()`` are split into disjoint train/val/test pools
    (:func:`normlab.data.digits.split_indices`: 1,257 / 270 / 270), so val/test pairs only show
    digit samples never seen in training. ``num_<split>`` pairs are drawn from the split's pool
    without repetition (``None``: the whole pool); see :func:`render_pair` for the drawing. The
    files go to ``<root>/digit_pairs/<tag>/`` where ``<tag>`` hashes the generation parameters
    (counts, ``image_size``, ``generation_seed``, generator version), so other parameters never
    reuse or overwrite them; ``manifest.json`` there lists each file's ``load_digits()`` row
    and label. Files are generated by :meth:`prepare_data` (or :meth:`setup`, if missing).

    The other arguments are :class:`AlignedDataModule`'s, with defaults for 64-px digits: a mild
    jitter (resize to 72, crop 64) and no flip, as digits are not mirror-invariant. The PNGs are
    grayscale; ``in_channels``/``out_channels=3`` replicate them to RGB when read.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        num_train: int | None = None,
        num_val: int | None = None,
        num_test: int | None = None,
        image_size: int = 64,
        generation_seed: int = 0,
        direction: str = "AtoB",
        load_size: int = 72,
        crop_size: int = 64,
        flip: bool = False,
        in_channels: int = 1,
        out_channels: int = 1,
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        on_bad_sample: str = "raise",
    ) -> None:
        available = pool_sizes()
        counts: dict[str, int] = {}
        for split, value in (("train", num_train), ("val", num_val), ("test", num_test)):
            if value is None:
                counts[split] = available[split]
                continue
            count = check_int(f"num_{split}", value, minimum=1)
            if count > available[split]:
                raise ArgumentError(
                    f"num_{split}",
                    value,
                    f"{{key}} must be <= {available[split]} (the digits in the {split} pool; "
                    f"null uses them all), got {value!r}",
                )
            counts[split] = count
        # Counts are stored resolved, so `null` and the explicit pool size share one folder.
        params = {
            "version": GENERATOR_VERSION,
            **{f"num_{split}": counts[split] for split in SPLITS},
            "image_size": check_int("image_size", image_size, minimum=16),
            "generation_seed": check_int("generation_seed", generation_seed, minimum=0),
        }
        super().__init__(
            root=self.generated_root(root, "digit_pairs", params),
            direction=direction,
            load_size=load_size,
            crop_size=crop_size,
            flip=flip,
            in_channels=in_channels,
            out_channels=out_channels,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            seed=seed,
            on_bad_sample=on_bad_sample,
        )

    def _check_layout_early(self) -> None:
        pass  # the folders are written by prepare_data(); setup() checks them

    def manifest(self) -> dict[str, list[dict[str, Any]]]:
        """Per split, ``{"file", "digit_index", "label"}`` for each pair (generating if needed)."""
        self.prepare_data()
        with open(os.path.join(self.root, MANIFEST), encoding="utf-8") as f:
            return json.load(f)

    def generate(self, directory: str, params: dict[str, Any]) -> None:
        generate_digit_pairs(directory, params)
