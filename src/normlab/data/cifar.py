"""CIFAR-10/100 from the python version's pickled batch files.

The layout is checked in ``__init__`` (so ``num_classes`` / ``class_names`` are known before the
model is built, and a wrong path fails before any training starts). Labels outside the class range
follow ``on_bad_sample``; see :mod:`normlab.data.bad_samples`.

The files are pickles, and unpickling runs whatever callables a file names. They are read with an
unpickler that builds only what CIFAR's files hold (numpy arrays, lists, dicts, bytes, strings,
numbers) and refuses any other name, so a file placed under ``data.root`` cannot run code.
"""

from __future__ import annotations

import codecs
import os
import pickle
from typing import Any, BinaryIO, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import check_integrity, download_and_extract_archive
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


# The callables a CIFAR pickle may name: numpy's array, scalar and dtype constructors (under numpy
# 1's and numpy 2's module names) and the codec protocol-2 pickles encode bytes with.
_ARRAY_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_SCALAR = np.float64(0).__reduce__()[0]
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
    **{
        (f"numpy.{core}.multiarray", "_reconstruct"): _ARRAY_RECONSTRUCT
        for core in ("core", "_core")
    },
    **{(f"numpy.{core}.multiarray", "scalar"): _SCALAR for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): np.frombuffer for core in ("core", "_core")},
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        raise pickle.UnpicklingError(
            f"it names {module}.{name}; a CIFAR file holds only numpy arrays, lists, dicts, "
            "bytes, strings and numbers"
        )


def load_cifar_pickle(handle: BinaryIO) -> Any:
    """Unpickle one CIFAR file (Python 2 pickles: their strings decode as latin1) building numpy
    arrays and plain Python values only; ``pickle.UnpicklingError`` for anything else."""
    return _ArraysOnlyUnpickler(handle, encoding="latin1").load()


class CIFARImages(Dataset):
    """CIFAR images (``N×32×32×3`` uint8) and labels; items are ``(PIL image, label)``, as
    torchvision's CIFAR datasets give them."""

    def __init__(self, data: np.ndarray, targets: list[int]) -> None:
        self.data = data
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.data[index]), self.targets[index]


def _no_md5(files: list[list[str]]) -> list[list[str | None]]:
    return [[name, None] for name, _ in files]


class CIFAR10NoMD5(CIFAR10):
    """``CIFAR10``'s file names with every md5 set to None: ``check_integrity`` then only checks
    that a file exists."""

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
                names = load_cifar_pickle(f)[meta["key"]]
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
        if not self.download or self._verified(self._expected_files()):
            return
        cls = self.dataset_cls
        try:
            download_and_extract_archive(cls.url, self.root, filename=cls.filename, md5=cls.tgz_md5)
        except (OSError, RuntimeError) as e:
            raise ConfigError(
                f"data.download=true: fetching {_PRETTY[self.variant]} into {self.root} failed "
                f"({type(e).__name__}: {e}); put the python version at {self.folder} instead"
            ) from e

    def _md5s(self) -> dict[str, str | None]:
        cls = self.dataset_cls
        return {**dict(cls.train_list + cls.test_list), cls.meta["filename"]: cls.meta["md5"]}

    def _verified(self, names: list[str]) -> bool:
        md5s = self._md5s()
        return all(check_integrity(os.path.join(self.folder, name), md5s[name]) for name in names)

    def _load(self, train: bool) -> CIFARImages:
        names = self._batch_files(train)
        for name in [*names, self.dataset_cls.meta["filename"]]:
            if not self._verified([name]):
                raise ConfigError(
                    f"data.root: {os.path.join(self.folder, name)} fails its md5 check; re-fetch "
                    "the official python version, or set data.check_integrity=false to use "
                    "these files"
                )
        images, labels = [], []
        for name in names:
            batch_images, batch_labels = self._read_batch(os.path.join(self.folder, name))
            images.append(batch_images)
            labels += batch_labels
        data = np.vstack(images).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
        return CIFARImages(data, labels)

    # -- broken files and labels ------------------------------------------------------------------

    def _batch_files(self, train: bool) -> list[str]:
        cls = self.dataset_cls
        return [name for name, _ in (cls.train_list if train else cls.test_list)]

    def _read_batch(self, path: str) -> tuple[np.ndarray, list[int]]:
        """``(images as N×3072 uint8, labels)`` of one batch file; a DataError naming the file
        when it does not parse, holds anything but plain data, or has as many labels as images."""
        try:
            with open(path, "rb") as f:
                entry = load_cifar_pickle(f)
            labels = list(entry["labels"] if "labels" in entry else entry["fine_labels"])
            images = np.asarray(entry["data"])
            if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
                problem = f"its data is {images.dtype} {list(images.shape)}, not N×3072 uint8"
            elif len(images) != len(labels):
                problem = f"{len(images)} images but {len(labels)} labels"
            else:
                return images, labels
        except Exception as e:  # a truncated or corrupt pickle raises almost anything
            problem = f"{type(e).__name__}: {e}"
        raise DataError(
            f"data.root: {path} is not a readable {_PRETTY[self.variant]} batch file ({problem}); "
            "re-fetch the official python version. data.on_bad_sample=skip does not apply: a "
            "batch file holds thousands of samples, and leaving them out would change the dataset"
        )

    def _check_labels(self, dataset: CIFARImages, train: bool) -> BadSamples:
        """Samples whose label is outside ``0..num_classes-1``, settled by ``on_bad_sample``."""
        split = "train" if train else "test"
        labels = np.asarray(dataset.targets, dtype=np.int64)
        report = BadSamples(split, self.folder, len(labels))
        bad = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
        if bad.size:
            # Which file and row each sample came from: torchvision concatenates the files.
            names = self._batch_files(train)
            sizes = [len(self._read_batch(os.path.join(self.folder, name))[1]) for name in names]
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
        self.class_names = self._read_class_names()
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
