"""Broken samples in the data modules that read files: ``data.on_bad_sample: raise | skip``.

``raise`` stops with a :class:`~normlab.errors.DataError` naming the file (or COCO annotation) and
what is wrong; ``skip`` leaves the sample out, counts it and logs one summary line per split.
Problems are found in two places:

- at setup, everything that a file's header or the annotations tell (missing files, files that
  are not images, sizes, box geometry, labels): every sample is checked once, so the count is
  known before the first step and ``raise`` fails before any training. Only headers are read
  (:func:`header_size`): about 40 µs a JPEG on a warm local disk, under a minute for ImageNet's
  1.28M files, more on a cold network filesystem;
- when a sample is decoded, what only decoding shows (truncated or corrupt pixel data). Decoding
  every file at setup would cost as much as a single-process epoch of loading (3-4 ms a JPEG,
  over an hour for ImageNet), and PIL's cheap ``verify()`` does not see a truncated JPEG. Under
  ``skip`` such a sample is replaced by the next one that decodes (:class:`SkipUndecodable`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from normlab.errors import DataError
from normlab.ranges import ArgumentError

log = logging.getLogger(__name__)

BAD_SAMPLE_POLICIES = ("raise", "skip")

# What reading a header or decoding a file raises when the file is not a usable image: PIL turns
# most plugin errors into OSError (UnidentifiedImageError, "image file is truncated"), a few
# decoders raise SyntaxError/ValueError/EOFError, and oversized images DecompressionBombError.
HEADER_ERRORS = (OSError, ValueError, Image.DecompressionBombError)
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

REASON_MISSING = "file missing"
REASON_NOT_IMAGE = "not a readable image"

# File names listed per reason in a summary line; the rest are counted.
NAMES_SHOWN = 5


def listing(names: Sequence[str]) -> str:
    """The first :data:`NAMES_SHOWN` of ``names``, comma-separated, and how many more there are."""
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown + (f", and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else "")


def check_on_bad_sample(value: Any) -> str:
    """``value`` if it is one of :data:`BAD_SAMPLE_POLICIES`; ArgumentError otherwise."""
    if not isinstance(value, str) or value not in BAD_SAMPLE_POLICIES:
        raise ArgumentError(
            "on_bad_sample",
            value,
            f"{{key}} must be one of {list(BAD_SAMPLE_POLICIES)}, got {value!r}",
        )
    return value


# --------------------------------------------------------------------------------------------------
# Found at setup
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One bad thing: ``reason`` is shared by problems of a kind (the summary groups by it),
    ``name`` is what the summary lists (a file name, ``annotation 7``), ``detail`` a sentence
    that stands alone in an error (full path or json and ids, and the specifics), ``sample`` the
    index of the sample it spoils (None: nothing to leave out, e.g. an annotation of no image)."""

    reason: str
    name: str
    detail: str
    sample: int | None


class BadSamples:
    """The problems found in one split at setup, and what ``data.on_bad_sample`` makes of them
    (:meth:`settle`). ``where`` (the split's folder or json) heads the error and summary line;
    ``total`` is the number of samples before any is left out."""

    def __init__(self, split: str, where: str, total: int) -> None:
        self.split = split
        self.where = where
        self.total = total
        self.problems: list[Problem] = []

    def add(self, reason: str, name: str, detail: str, sample: int | None) -> None:
        self.problems.append(Problem(reason, name, detail, sample))

    @property
    def bad_samples(self) -> set[int]:
        """Indices of the samples left out under ``skip``."""
        return {p.sample for p in self.problems if p.sample is not None}

    @property
    def skipped(self) -> int:
        return len(self.bad_samples)

    def counts(self) -> dict[str, int]:
        """Number of problems by reason."""
        return dict(Counter(p.reason for p in self.problems))

    def summary(self) -> str:
        """``reason: count (names)`` for each reason, in order of first appearance."""
        parts = []
        for reason, count in self.counts().items():
            names = [p.name for p in self.problems if p.reason == reason]
            parts.append(f"{reason}: {count} ({listing(names)})")
        return "; ".join(parts)

    def settle(self, policy: str) -> None:
        """Nothing when no problem was found; else raise (``raise``: the first problem in full,
        with the count of all) or log one summary line (``skip``, unless no sample is left)."""
        if not self.problems:
            return
        if policy == "raise":
            raise DataError(
                f"{self.problems[0].detail}; {len(self.problems)} problem(s) in the {self.split} "
                f"split of {self.where} ({self.summary()}). Fix or remove them, or set "
                "data.on_bad_sample=skip to leave those samples out"
            )
        if self.skipped == self.total:
            raise DataError(
                f"data: every one of the {self.total} {self.split} samples of {self.where} is bad "
                f"({self.summary()})"
            )
        log.warning(
            "data: skipped %d of %d %s samples (%s): %s",
            self.skipped,
            self.total,
            self.split,
            self.where,
            self.summary(),
        )

    def kept(self, items: Iterable[Any]) -> list[Any]:
        """``items`` (one per sample, in index order) without those of the bad samples."""
        bad = self.bad_samples
        return [item for i, item in enumerate(items) if i not in bad]


def header_size(path: str) -> tuple[int, int]:
    """``(width, height)`` from the file's header: PIL decodes pixels lazily, so only the first
    bytes are read. Raises FileNotFoundError or one of :data:`HEADER_ERRORS`."""
    with Image.open(path) as image:
        return image.size


def check_header(report: BadSamples, index: int, path: str, name: str) -> tuple[int, int] | None:
    """``(width, height)`` of image ``path`` (sample ``index``, listed as ``name``), or None after
    adding the problem to ``report`` when it is missing or not an image."""
    try:
        return header_size(path)
    except FileNotFoundError:
        report.add(REASON_MISSING, name, f"{path}: {REASON_MISSING}", index)
    except HEADER_ERRORS as error:
        detail = f"cannot read {path} as an image ({type(error).__name__}: {error})"
        report.add(REASON_NOT_IMAGE, name, detail, index)
    return None


# --------------------------------------------------------------------------------------------------
# Found when decoding
# --------------------------------------------------------------------------------------------------


class UndecodableSampleError(DataError):
    """A sample whose file could not be decoded (or no longer matches what setup checked);
    :class:`SkipUndecodable` replaces such samples under ``skip``."""


def undecodable(path: str, error: BaseException) -> UndecodableSampleError:
    return UndecodableSampleError(
        f"data: cannot decode {path} ({type(error).__name__}: {error}); replace or remove the "
        "file, or set data.on_bad_sample=skip to use the next sample in its place"
    )


def load_image(path: str) -> Image.Image:
    """The decoded image in ``path``; :class:`UndecodableSampleError` naming it if it cannot be
    decoded (truncated files included: PIL's LOAD_TRUNCATED_IMAGES is left off on purpose, as it
    would fill the missing part with grey and train on it)."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except DECODE_ERRORS as error:
        raise undecodable(path, error) from error


def convert_mode(image: Image.Image, mode: str) -> Image.Image:
    """``image`` as ``mode`` ("RGB" or "L") from any PIL mode: 16-bit grayscale is scaled to 8
    bits (PIL's own conversion clips it at 255, turning most pixels white), a palette with
    transparency goes through RGBA (PIL warns otherwise), and other modes (alpha, CMYK, bilevel)
    go through RGB, dropping alpha."""
    if image.mode == mode:
        return image
    if image.mode.startswith("I;16"):
        scaled = np.asarray(image, dtype=np.float32) / 257.0
        image = Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    return image.convert(mode)


class FileDataset(Protocol):
    """A dataset whose samples are files (what :class:`SkipUndecodable` wraps)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...

    def sample_file(self, index: int) -> str: ...


class SkipUndecodable(Dataset):
    """``dataset[index]``, or, when that sample's file cannot be decoded
    (:class:`UndecodableSampleError`), the next sample that can be (``data.on_bad_sample=skip``).

    Replaced rather than dropped from its batch: batches keep their size (batch statistics are
    what norms depend on, and pix2pix's one-sample batches would become empty) and every process
    keeps its number of steps, which DDP needs. The cost is that one sample is seen twice in an
    epoch. Failures are flagged in shared memory, so the main process can report those met by
    loader workers (:meth:`report`) and a file found broken is not decoded again.
    """

    def __init__(self, dataset: FileDataset, split: str) -> None:
        self.dataset = dataset
        self.split = split
        self.failed = torch.zeros(len(dataset), dtype=torch.bool).share_memory_()
        self._reported = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        n = len(self.dataset)
        for step in range(n):
            candidate = (index + step) % n
            if self.failed[candidate]:
                continue
            try:
                return self.dataset[candidate]
            except UndecodableSampleError as error:
                self.failed[candidate] = True
                log.warning(
                    "data: cannot decode %s (%s); the next %s sample is used in its place",
                    self.dataset.sample_file(candidate),
                    error.__cause__ or error,
                    self.split,
                )
        raise DataError(f"data: no sample of the {self.split} split can be decoded")

    def undecodable_files(self) -> list[str]:
        return [self.dataset.sample_file(i) for i in self.failed.nonzero().flatten().tolist()]

    def report(self) -> None:
        """Log one line listing the undecodable files, if any were found since the last report."""
        files = self.undecodable_files()
        if len(files) == self._reported:
            return
        self._reported = len(files)
        log.warning(
            "data: replaced %d of %d %s samples that could not be decoded by the next one: %s",
            len(files),
            len(self.dataset),
            self.split,
            listing(files),
        )


def guard_decoding(dataset: FileDataset, split: str, policy: str) -> Dataset:
    """``dataset`` as read under ``policy``: wrapped in :class:`SkipUndecodable` for ``skip``."""
    return SkipUndecodable(dataset, split) if policy == "skip" else dataset  # type: ignore[return-value]
