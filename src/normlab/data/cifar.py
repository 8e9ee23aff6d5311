"""CIFAR-10/100 from the python version's pickled batch files.

The layout is checked in ``__init__`` (so ``num_classes`` / ``class_names`` are known before the
model is built, and a wrong path fails before any training starts). Labels outside the class range
follow ``on_bad_sample``; see :mod:`normlab.data.bad_samples`.
"""

from __future__ import annotations

import os
import pickle
from typing import Literal

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.transforms import v2
from typing_extensions import Unpack

from normlab.data.bad_samples import BadSamples, check_on_bad_sample
from normlab.data.datamodule import ImageClassificationDataModule, LoaderOptions
from normlab.data.transforms import TransformSubset, to_float_normalized
from normlab.errors import ConfigError, DataError
from normlab.ranges import ArgumentError, is_number

CIFAR_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip

CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
]  # fmt: skip

# Fixed, independent of `seed`: the train/val carve-out never changes between runs.
CIFAR_VAL_SPLIT_SEED = 0

REASON_LABEL = "label out of range"


def _no_md5(files: list[list[str]]) -> list[list[str | None]]:
    return [[name, None] for name, _ in files]


class CIFAR10NoMD5(CIFAR10):
    """``CIFAR10`` with every md5 set to None: torchvision then only checks that the files exist,
    and its real parsing code (``__init__`` / ``_load_meta``) runs unchanged."""

    train_list = _no_md5(CIFAR10.train_list)
    test_list = _no_md5(CIFAR10.test_list)
    meta = {**CIFAR10.meta, "md5": None}


class CIFAR100NoMD5(CIFAR100):
    """``CIFAR100`` without md5 checks (see :class:`CIFAR10NoMD5`)."""

    train_list = _no_md5(CIFAR100.train_list)
    test_list = _no_md5(CIFAR100.test_list)
    meta = {**CIFAR100.meta, "md5": None}


_DATASETS: dict[str, type[CIFAR10]] = {"cifar10": CIFAR10, "cifar100": CIFAR100}
_DATASETS_NO_MD5: dict[str, type[CIFAR10]] = {"cifar10": CIFAR10NoMD5, "cifar100": CIFAR100NoMD5}
_PRETTY = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


class CIFARDataModule(ImageClassificationDataModule):
    """CIFAR-10 or CIFAR-100 from the python version under ``root``.

    ``root`` must contain ``cifar-10-batches-py/`` (``data_batch_1``..``5``, ``test_batch``,
    ``batches.meta``) or ``cifar-100-python/`` (``train``, ``test``, ``meta``); with
    ``download=True`` torchvision fetches them in :meth:`prepare_data`. A fraction
    ``val_fraction`` of the official training set becomes the validation split (fixed generator,
    so the split is the same in every run); test is the official test set.
    ``check_integrity=False`` skips torchvision's md5 checks (files need only exist and parse).
    ``on_bad_sample``: what to do with a sample whose label is out of range (``raise`` or
    ``skip``); a batch file that does not parse always stops setup, as it holds a whole batch.
    """

    in_channels = 3

    def __init__(
        self,
        root: str | os.PathLike[str],
        variant: Literal["cifar10", "cifar100"] = "cifar10",
        download: bool = False,
        val_fraction: float = 0.1,
        check_integrity: bool = True,
        on_bad_sample: str = "raise",
        **loader_options: Unpack[LoaderOptions],
    ) -> None:
        super().__init__(**loader_options)
        if variant not in _DATASETS:
            raise ArgumentError(
                "variant", variant, f"{{key}} must be one of {sorted(_DATASETS)}, got {variant!r}"
            )
        if not (is_number(val_fraction) and 0.0 < val_fraction < 1.0):
            raise ArgumentError(
                "val_fraction",
                val_fraction,
                f"{{key}} must be a number strictly between 0 and 1, got {val_fraction!r}",
            )
        self.root = os.path.expanduser(os.fspath(root))
        self.variant = variant
        self.download = bool(download)
        self.val_fraction = float(val_fraction)
        self.check_integrity = bool(check_integrity)
        self.on_bad_sample = check_on_bad_sample(on_bad_sample)
        self.bad_samples: dict[str, BadSamples] = {}
        self.dataset_cls = (_DATASETS if self.check_integrity else _DATASETS_NO_MD5)[variant]
        self.folder = os.path.join(self.root, self.dataset_cls.base_folder)
        self.num_classes = 10 if variant == "cifar10" else 100
        self.class_names = list(CIFAR10_CLASSES if variant == "cifar10" else CIFAR100_CLASSES)
        self.mean, self.std = CIFAR_STATS[variant]
        if not self.download:
            self._check_files()
            self.class_names = self._read_class_names()

    # -- layout -----------------------------------------------------------------------------------

    def _expected_files(self) -> list[str]:
        cls = self.dataset_cls
        return [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]

    def _check_files(self) -> None:
        pretty = _PRETTY[self.variant]
        hint = (
            f"put the {pretty} python version there (from {self.dataset_cls.filename}) or set "
            "data.download=true where internet is available"
        )
        if not os.path.isdir(self.folder):
            raise ConfigError(f"data.root: {self.folder} not found; {hint}")
        missing = [
            f for f in self._expected_files() if not os.path.isfile(os.path.join(self.folder, f))
        ]
        if missing:
            raise ConfigError(
                f"data.root: {self.folder} lacks {', '.join(missing)} "
                f"(expected {', '.join(self._expected_files())}); {hint}"
            )

    def _read_class_names(self) -> list[str]:
        meta = self.dataset_cls.meta
        path = os.path.join(self.folder, meta["filename"])
        try:
            with open(path, "rb") as f:
                names = pickle.load(f, encoding="latin1")[meta["key"]]
        except Exception as e:  # unreadable / not a CIFAR meta pickle
            raise ConfigError(
                f"data.root: {path} is not a readable {_PRETTY[self.variant]} meta pickle with "
                f"key {meta['key']!r} ({type(e).__name__}: {e})"
            ) from e
        names = [str(n) for n in names]
        if len(names) != self.num_classes:
            raise ConfigError(
                f"data.root: {path} lists {len(names)} classes, expected {self.num_classes} for "
                f"data.variant={self.variant}"
            )
        return names

    # -- transforms -------------------------------------------------------------------------------

    def _resize(self) -> list[v2.Transform]:
        if self.image_size == 32:
            return []
        return [v2.Resize(self.image_size, antialias=True)]

    def train_transform(self) -> v2.Compose:
        if not self.augment:
            return self.eval_transform()
        return v2.Compose(
            [
                v2.ToImage(),
                v2.RandomCrop(32, padding=4),
                v2.RandomHorizontalFlip(),
                *self._resize(),
                *to_float_normalized(self.mean, self.std),
            ]
        )

    def eval_transform(self) -> v2.Compose:
        return v2.Compose(
            [v2.ToImage(), *self._resize(), *to_float_normalized(self.mean, self.std)]
        )

    # -- Lightning hooks --------------------------------------------------------------------------

    def prepare_data(self) -> None:
        if not self.download:
            return
        try:
            for train in (True, False):
                self.dataset_cls(self.root, train=train, download=True)
        except (OSError, RuntimeError) as e:
            raise ConfigError(
                f"data.download=true: fetching {_PRETTY[self.variant]} into {self.root} failed "
                f"({type(e).__name__}: {e}); put the python version at {self.folder} instead"
            ) from e

    def _load(self, train: bool) -> CIFAR10:
        try:
            dataset = self.dataset_cls(self.root, train=train, download=False)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
            raise ConfigError(
                f"data.root: {self.folder} failed torchvision's md5 check ({e}); re-fetch the "
                "official python version, or set data.check_integrity=false to use these files"
            ) from e
        except Exception as e:  # unpickling a truncated or corrupt file raises almost anything
            raise self._locate_broken_batch(train, f"{type(e).__name__}: {e}") from e
        if len(dataset.data) != len(dataset.targets):
            raise self._locate_broken_batch(
                train, f"{len(dataset.data)} images but {len(dataset.targets)} labels"
            )
        return dataset

    # -- broken files and labels ------------------------------------------------------------------

    def _batch_files(self, train: bool) -> list[str]:
        cls = self.dataset_cls
        return [name for name, _ in (cls.train_list if train else cls.test_list)]

    @staticmethod
    def _parse_batch(path: str) -> tuple[int, list[int]]:
        """``(number of images, labels)`` of one batch file, read as torchvision reads it."""
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        labels = entry["labels"] if "labels" in entry else entry["fine_labels"]
        return len(entry["data"]), list(labels)

    def _locate_broken_batch(self, train: bool, problem: str) -> DataError:
        """A DataError naming the first batch file of the split that does not parse or whose
        image and label counts differ: torchvision's loader does not say which file it failed
        on. Re-reads the files, so only for the error path."""
        for name in self._batch_files(train):
            path = os.path.join(self.folder, name)
            try:
                images, labels = self._parse_batch(path)
            except Exception as e:
                problem = f"{type(e).__name__}: {e}"
                break
            if images != len(labels):
                problem = f"{images} images but {len(labels)} labels"
                break
        else:
            path = self.folder
        return DataError(
            f"data.root: {path} is not a readable {_PRETTY[self.variant]} batch file ({problem}); "
            "re-fetch the official python version. data.on_bad_sample=skip does not apply: a "
            "batch file holds thousands of samples, and leaving them out would change the dataset"
        )

    def _check_labels(self, dataset: CIFAR10, train: bool) -> BadSamples:
        """Samples whose label is outside ``0..num_classes-1``, settled by ``on_bad_sample``."""
        split = "train" if train else "test"
        labels = np.asarray(dataset.targets, dtype=np.int64)
        report = BadSamples(split, self.folder, len(labels))
        bad = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
        if bad.size:
            # Which file and row each sample came from: torchvision concatenates the files.
            names = self._batch_files(train)
            sizes = [self._parse_batch(os.path.join(self.folder, name))[0] for name in names]
            starts = np.cumsum([0, *sizes])
            for index in bad.tolist():
                file = int(np.searchsorted(starts, index, side="right")) - 1
                name, row = names[file], index - int(starts[file])
                detail = (
                    f"{os.path.join(self.folder, name)}: row {row} has label {labels[index]}, "
                    f"outside 0..{self.num_classes - 1}"
                )
                report.add(REASON_LABEL, f"{name} row {row}", detail, index)
        report.settle(self.on_bad_sample)
        self.bad_samples[split] = report
        return report

    def _build(self) -> None:
        if self.download:
            self.prepare_data()  # no-op when the files are already there
        self._check_files()
        full_train = self._load(train=True)
        test = self._load(train=False)
        self.class_names = [str(c) for c in full_train.classes]
        bad_train = self._check_labels(full_train, train=True).bad_samples
        test_report = self._check_labels(test, train=False)

        n = len(full_train)
        n_val = max(1, round(n * self.val_fraction))
        if n_val >= n:
            raise ArgumentError(
                "val_fraction",
                self.val_fraction,
                f"{{key}}={self.val_fraction} leaves no training images out of {n}",
            )
        generator = torch.Generator().manual_seed(CIFAR_VAL_SPLIT_SEED)
        perm = torch.randperm(n, generator=generator)
        # Bad samples leave the carve-out as it is (it is drawn from the file order alone).
        val_idx, train_idx = (
            [i for i in part.sort().values.tolist() if i not in bad_train]
            for part in (perm[:n_val], perm[n_val:])
        )

        self.train_set = TransformSubset(full_train, train_idx, self.train_transform())
        self.val_set = TransformSubset(full_train, val_idx, self.eval_transform())
        self.test_set = TransformSubset(
            test, test_report.kept(range(len(test))), self.eval_transform()
        )
