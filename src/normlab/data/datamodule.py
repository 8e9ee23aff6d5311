"""The base of every data module: loaders over ``train_set`` / ``val_set`` / ``test_set``.

- :class:`SplitDataModule`: the loading arguments every data module takes (batch size, workers,
  seed), checked once with error messages naming their config keys, and the three Lightning
  loaders, the training one in an order that depends only on the seed and the epoch
  (:mod:`normlab.data.samplers`), each split built on demand;
- :class:`ImageClassificationDataModule`: that plus the arguments every classification module
  takes (:class:`LoaderOptions`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, TypedDict

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from normlab.data.bad_samples import SkipUndecodable
from normlab.data.samplers import EpochSeededLoader, EpochSeededSampler, SeededSamples
from normlab.ranges import ArgumentError, check_int, is_int

log = logging.getLogger(__name__)

# The splits each Lightning stage reads.
STAGE_SPLITS = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
}


class SplitDataModule(pl.LightningDataModule):
    """The base of every data module: ``train/val/test_dataloader`` over ``train_set`` /
    ``val_set`` / ``test_set``. The training order depends only on ``seed`` and the epoch
    (:class:`EpochSeededSampler`), a split that is not set up yet is set up on demand, and at
    teardown (the end of fit, validate or test) each split read under ``on_bad_sample=skip`` logs
    the samples that failed to decode and were replaced (:class:`SkipUndecodable`). Subclasses
    may set ``collate_fn``."""

    # Validation and test batch; None: batch_size. Only modules whose evaluation does not depend
    # on the batch with population statistics (classification) offer it; with batch statistics
    # (task.eval_norm_statistics=batch) it is the normalization batch.
    eval_batch_size: int | None = None
    collate_fn: Callable[[list[Any]], Any] | None = None
    # Why a training batch of a single image cannot be trained on (a norm's batch statistics
    # over one value per channel), as the task's check_run found it; see drop_a_last_batch_of_one.
    batch_of_one_fails: str | None = None

    def __init__(
        self, batch_size: int, num_workers: int = 0, pin_memory: bool = False, seed: int = 0
    ) -> None:
        super().__init__()
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.num_workers = check_int("num_workers", num_workers, minimum=0)
        if not is_int(seed):
            raise ArgumentError("seed", seed, f"{{key}} must be an integer, got {seed!r}")
        self.seed = seed
        self.pin_memory = bool(pin_memory)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def drop_a_last_batch_of_one(self, reason: str) -> None:
        """The model cannot train on a batch of one image (``reason``): leave out an epoch's last
        training batch when it would hold one image (per process, as DDP splits the data)."""
        self.batch_of_one_fails = reason

    def _drops_last(self, dataset: Dataset) -> bool:
        if self.batch_of_one_fails is None:
            return False
        trainer = getattr(self, "trainer", None)
        processes = trainer.world_size if trainer is not None else 1
        # DDP's DistributedSampler pads the data to the same count on every process.
        per_process = math.ceil(len(dataset) / processes)
        if per_process % self.batch_size != 1:
            return False
        log.info(
            "the last training batch of each epoch would hold 1 image (%d images per process, "
            "data.batch_size=%d) and %s: it is left out",
            per_process,
            self.batch_size,
            self.batch_of_one_fails,
        )
        return True

    def _dataset(self, split: str) -> Dataset:
        """Build one split (``train``, ``val`` or ``test``); for :meth:`setup_splits`."""
        raise NotImplementedError

    def setup_splits(self, stage: str | None, *, test_is_val: bool) -> None:
        """Build only the splits ``stage`` needs (all for ``None``), each once; ``test_is_val``
        makes the test split the val split's dataset."""
        needed = STAGE_SPLITS.get(stage or "", ("train", "val", "test"))
        if "train" in needed and self.train_set is None:
            self.train_set = self._dataset("train")
        if ("val" in needed or ("test" in needed and test_is_val)) and self.val_set is None:
            self.val_set = self._dataset("val")
        if "test" in needed and self.test_set is None:
            self.test_set = self.val_set if test_is_val else self._dataset("test")

    def _loader(self, dataset: Dataset | None, *, train: bool) -> DataLoader:
        assert dataset is not None
        batch_size = self.batch_size
        if not train and self.eval_batch_size is not None:
            batch_size = self.eval_batch_size
        return (EpochSeededLoader if train else DataLoader)(
            SeededSamples(dataset) if train else dataset,
            batch_size=batch_size,
            sampler=EpochSeededSampler(dataset, self.seed) if train else None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn,
            drop_last=train and self._drops_last(dataset),
            # Worker seeds come from this generator, not the global RNG, which then advances
            # only with what the model draws (dropout, drop path): a resumed run can restore it.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            self.setup("test")
        return self._loader(self.test_set, train=False)

    def teardown(self, stage: str) -> None:
        for dataset in (self.train_set, self.val_set, self.test_set):
            if isinstance(dataset, SkipUndecodable):
                dataset.report()
        super().teardown(stage)


class LoaderOptions(TypedDict, total=False):
    """The loading arguments every data module takes; see :class:`ImageClassificationDataModule`."""

    batch_size: int
    eval_batch_size: int | None
    num_workers: int
    pin_memory: bool
    image_size: int
    augment: bool
    seed: int


class ImageClassificationDataModule(SplitDataModule):
    """Base class: subclasses set ``num_classes``, ``in_channels``, ``class_names`` in ``__init__``
    and ``train_set`` / ``val_set`` / ``test_set`` in :meth:`setup`."""

    num_classes: int
    in_channels: int
    class_names: list[str]
    # What a batch holds (a task takes batches of one such kind: Task.batch_format), and the
    # constructor argument that sets image_size.
    batch_format = "labelled images"
    image_size_option = "image_size"

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        image_size: int = 32,
        augment: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, seed)
        if eval_batch_size is not None:
            self.eval_batch_size = check_int("eval_batch_size", eval_batch_size, minimum=1)
        self.image_size = check_int("image_size", image_size, minimum=1)
        self.augment = bool(augment)

    # -- subclasses -------------------------------------------------------------------------------

    def _build(self) -> None:
        """Create ``train_set``, ``val_set`` and ``test_set`` (called once)."""
        raise NotImplementedError

    # -- Lightning hooks --------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        # All three splits are cheap to index (data are decoded lazily or already in memory), so
        # every stage builds them all; this keeps `dm.setup("fit")` followed by `trainer.test(dm)`
        # simple and idempotent.
        if self.train_set is None:
            self._build()

    def _ready(self) -> None:
        if self.train_set is None:
            self.setup()

    # -- conveniences -----------------------------------------------------------------------------

    @property
    def train_size(self) -> int:
        self._ready()
        return len(self.train_set)  # type: ignore[arg-type]

    @property
    def val_size(self) -> int:
        self._ready()
        return len(self.val_set)  # type: ignore[arg-type]

    @property
    def test_size(self) -> int:
        self._ready()
        return len(self.test_set)  # type: ignore[arg-type]
