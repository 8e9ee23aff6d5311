"""Shared pieces of the image-classification data modules.

- :class:`ImageClassificationDataModule`: the common constructor arguments (validated, with
  config-key error messages), the seeded/deterministic training loader and the eval loaders;
- :class:`TransformSubset`: a view of a dataset restricted to some indices with its own transform,
  so one decoded copy of a training set serves both the augmented train split and the clean val
  split;
- normalisation constants and the v2 pipelines used by the CIFAR / ImageFolder modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypedDict

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision.transforms import v2

from normlab.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_int(key: str, value: Any, *, minimum: int) -> int:
    """``value`` as an int ≥ ``minimum``; ConfigError naming ``data.<key>`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"data.{key} must be an integer >= {minimum}, got {value!r}")
    return value


def to_float_normalized(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    """uint8/float image → float32 in [0, 1] → normalised with ``mean``/``std``."""
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


class TransformSubset(Dataset):
    """``dataset[indices[i]]`` with ``transform`` applied to the image (targets untouched)."""

    def __init__(
        self,
        dataset: Dataset,
        indices: Sequence[int] | torch.Tensor,
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, target = self.dataset[self.indices[index]]
        if self.transform is not None:
            image = self.transform(image)
        return image, target


class EpochSeededSampler(RandomSampler):
    """Shuffles as ``DistributedSampler(shuffle=True, seed=seed)`` with a single replica: epoch
    ``e`` is ``randperm(n)`` drawn from ``seed + e``. Under DDP Lightning replaces it (it is a
    RandomSampler) by a DistributedSampler seeded with the run's seed, so with the same seed a
    run on k processes sees, step for step, the same samples as a run on one process with a k
    times larger batch.

    Each index comes with a seed for that sample's augmentation (see :class:`SeededSamples`),
    drawn from the same generator: what a sample looks like depends on the seed, the epoch and
    its position only, not on the global RNG, the number of workers or a resume.
    :meth:`skip_next` makes the next pass start further in (resuming mid-epoch)."""

    def __init__(self, data_source: Dataset, seed: int) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_next(self, samples: int) -> None:
        """Leave out the first ``samples`` of the next pass (those seen before an interruption)."""
        self._skip = samples

    def __len__(self) -> int:
        return len(self.data_source) - self._skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        n = len(self.data_source)
        order = torch.randperm(n, generator=generator).tolist()
        sample_seeds = torch.randint(2**62, (n,), generator=generator).tolist()
        skip, self._skip = self._skip, 0
        yield from zip(order[skip:], sample_seeds[skip:], strict=True)


class EpochSeededLoader(DataLoader):
    """The training loader. Its order is a function of the sampler's seed and epoch, which the
    checkpoint's loop state holds; :class:`~normlab.callbacks.ExactResume` makes the sampler skip
    the batches an interrupted epoch had trained. ``state_dict``/``load_state_dict`` say so to
    Lightning's fit loop (which otherwise warns on every mid-epoch resume that the loader is not
    resumable) and check that a resumed run shuffles with the seed it started with."""

    def state_dict(self) -> dict[str, int]:
        sampler = self.sampler
        return {"seed": sampler.seed} if isinstance(sampler, EpochSeededSampler) else {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.sampler
        if (
            isinstance(sampler, EpochSeededSampler)
            and state.get("seed", sampler.seed) != sampler.seed
        ):
            raise ConfigError(
                f"data.seed={sampler.seed}, but the checkpoint's run shuffled its data with "
                f"seed {state['seed']}: resume with seed={state['seed']} (or resume_mode=weights)"
            )


class SeededSamples(Dataset):
    """``dataset[index]`` for ``(index, seed)`` keys (from :class:`EpochSeededSampler`), with the
    torch RNG seeded by ``seed`` while the sample is loaded and transformed, then restored; plain
    ``int`` keys (DDP's DistributedSampler) read the sample with the global RNG as usual."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if isinstance(key, int):
            return self.dataset[key]
        index, seed = key
        # Only the CPU generator: torch.manual_seed also seeds every accelerator, and with
        # fork_rng's bookkeeping cost ~0.8 ms a sample (a minute per Fashion-MNIST epoch) where
        # this costs ~10 µs. The CPU stream drawn is the same.
        state = torch.get_rng_state()
        torch.default_generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(state)


# The splits each Lightning stage reads.
STAGE_SPLITS = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
}


class SplitLoaders:
    """``train/val/test_dataloader`` over ``train_set`` / ``val_set`` / ``test_set``, shared by
    the data modules: the training order depends only on ``seed`` and the epoch
    (:class:`EpochSeededSampler`), and a split that is not set up yet is set up on demand.
    Subclasses may set ``collate_fn``."""

    batch_size: int
    num_workers: int
    pin_memory: bool
    seed: int
    collate_fn: Callable[[list[Any]], Any] | None = None
    train_set: Dataset | None
    val_set: Dataset | None
    test_set: Dataset | None

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
        return (EpochSeededLoader if train else DataLoader)(
            SeededSamples(dataset) if train else dataset,
            batch_size=self.batch_size,
            sampler=EpochSeededSampler(dataset, self.seed) if train else None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn,
            drop_last=False,
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


class LoaderOptions(TypedDict, total=False):
    """The loading arguments every data module takes; see :class:`ImageClassificationDataModule`."""

    batch_size: int
    num_workers: int
    pin_memory: bool
    image_size: int
    augment: bool
    seed: int


class ImageClassificationDataModule(SplitLoaders, pl.LightningDataModule):
    """Base class: subclasses set ``num_classes``, ``in_channels``, ``class_names`` in ``__init__``
    and ``train_set`` / ``val_set`` / ``test_set`` in :meth:`setup`."""

    num_classes: int
    in_channels: int
    class_names: list[str]

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        image_size: int = 32,
        augment: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.num_workers = check_int("num_workers", num_workers, minimum=0)
        self.image_size = check_int("image_size", image_size, minimum=1)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"data.seed must be an integer, got {seed!r}")
        self.seed = seed
        self.pin_memory = bool(pin_memory)
        self.augment = bool(augment)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

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
