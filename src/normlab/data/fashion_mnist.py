"""Fashion-MNIST (Xiao et al. 2017): 60,000 training and 10,000 test images, 28×28 grayscale,
10 balanced classes, read from the original IDX files.

The four files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, each optionally ``.gz``) are decoded once into one uint8 tensor per
split; per-sample work is the reference augmentation (pad-4 random crop, horizontal flip) and a
scalar normalisation. ``make data-fashion-mnist`` puts the files in place (see
:mod:`normlab.data.fetch_fashion_mnist`).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
from collections.abc import Callable

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torchvision.datasets import FashionMNIST
from torchvision.transforms import v2
from typing_extensions import Unpack

from normlab.data.datamodule import ImageClassificationDataModule, LoaderOptions
from normlab.data.digits import TensorImageDataset
from normlab.errors import ConfigError, DataError
from normlab.ranges import ArgumentError, check_int

CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

# File stems by split, as published (and as torchvision names them).
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Where torchvision's FashionMNIST keeps them under its root; a flat folder works too.
TORCHVISION_SUBDIR = os.path.join("FashionMNIST", "raw")

# IDX magic numbers: two zero bytes, the element type (0x08: unsigned byte), the number of dims.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
GZIP_MAGIC = b"\x1f\x8b"

# Fixed, independent of `seed`: the validation carve-out and training subsets never change.
SPLIT_RANDOM_STATE = 0


def _read_bytes(path: str) -> bytes:
    """The file's content, gunzipped when it starts with gzip's magic (whatever its name)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as e:  # truncated or corrupt gzip stream
        raise DataError(f"data.root: {path} is not a readable gzip file ({e})") from e


def read_idx(path: str, magic: int) -> np.ndarray:
    """The uint8 array stored in an IDX file (gzip or not) whose magic number must be ``magic``;
    a DataError naming the file if the magic, the header or the data length is wrong."""
    data = _read_bytes(path)
    kind = "images" if magic == IMAGES_MAGIC else "labels"
    if len(data) < 4:
        raise DataError(f"data.root: {path} is truncated: {len(data)} bytes, no IDX header")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(
            f"data.root: {path} has magic number {found:#010x}, expected {magic:#010x} "
            f"(IDX unsigned-byte {kind}); is it the right file?"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"data.root: {path} is truncated inside its {header}-byte IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != expected:
        state = "truncated" if len(data) - header < expected else "longer than its header says"
        raise DataError(
            f"data.root: {path} is {state}: the header announces {'×'.join(map(str, shape))} "
            f"= {expected} bytes of {kind}, the file holds {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _files_in(folder: str) -> dict[str, str]:
    """``{stem: path}`` of the Fashion-MNIST files in ``folder`` (a plain file before a ``.gz``)."""
    found: dict[str, str] = {}
    for stem in (*FILES["train"], *FILES["test"]):
        for name in (stem, stem + ".gz"):
            if os.path.isfile(os.path.join(folder, name)):
                found[stem] = os.path.join(folder, name)
                break
    return found


def candidate_folders(root: str) -> list[str]:
    """Where the files are looked for: torchvision's layout first, then ``root`` itself."""
    return [os.path.join(root, TORCHVISION_SUBDIR), root]


def find_files(root: str) -> dict[str, tuple[str, str]]:
    """``{split: (images path, labels path)}`` from the first of :func:`candidate_folders` that
    holds all four files, each plain or ``.gz``; ConfigError saying what is missing otherwise."""
    stems = (*FILES["train"], *FILES["test"])
    for folder in candidate_folders(root):
        found = _files_in(folder)
        if len(found) == len(stems):
            return {
                split: (found[images], found[labels]) for split, (images, labels) in FILES.items()
            }
        if found:
            missing = [stem for stem in stems if stem not in found]
            raise ConfigError(
                f"data.root: {folder} lacks {', '.join(missing)} (plain or .gz) of the four "
                f"Fashion-MNIST IDX files; run `make data-fashion-mnist` or add them"
            )
    raise ConfigError(
        f"data.root: no Fashion-MNIST IDX files ({', '.join(stems)}, each plain or .gz) in "
        f"{' or '.join(candidate_folders(root))}; run `make data-fashion-mnist` or set "
        "data.download=true where there is internet"
    )


def load_split(images_path: str, labels_path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, 1, H, W)`` uint8 images and ``(N,)`` int64 labels of one split; DataError naming
    the file when the counts differ or a label is not a class."""
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataError(
            f"data.root: {images_path} holds {len(images)} images but {labels_path} holds "
            f"{len(labels)} labels"
        )
    bad = np.flatnonzero(labels >= len(CLASS_NAMES))
    if bad.size:
        raise DataError(
            f"data.root: {labels_path} row {bad[0]} has label {labels[bad[0]]}, outside "
            f"0..{len(CLASS_NAMES) - 1} ({bad.size} such rows)"
        )
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def download(root: str) -> None:
    """Fetch the four files into ``root/FashionMNIST/raw/`` with torchvision (needs internet);
    ConfigError with torchvision's reason, in one line, when that fails."""
    # torchvision prints each mirror it tries; the outcome is reported by the caller instead.
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            for train in (True, False):
                FashionMNIST(root, train=train, download=True)
        except (OSError, RuntimeError) as e:
            reason = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
            raise ConfigError(
                f"downloading Fashion-MNIST into {root} failed ({reason or type(e).__name__})"
            ) from None


def pixel_mean_std(images: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation of uint8 ``images`` in [0, 1], from a histogram of the 256
    values: exact, without a float copy of the whole set."""
    counts = torch.bincount(images.flatten(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255.0
    mean = float((counts * values).sum() / counts.sum())
    var = float((counts * (values - mean) ** 2).sum() / (counts.sum() - 1))
    return mean, var**0.5


class FashionMNISTDataModule(ImageClassificationDataModule):
    """Fashion-MNIST from the IDX files under ``root`` (``root/FashionMNIST/raw/`` as torchvision
    lays it out, or ``root`` itself; gzip or not).

    ``val_images`` training images (stratified, fixed split) become the validation split; test is
    the official 10,000. ``train_subset=N`` trains on a stratified N of the rest (the same N
    images in every run). Normalised with the training split's pixel mean/std; ``augment``: the
    reference's 4-pixel zero-padded random crop and horizontal flip. ``image_size`` other than 28
    resizes once, at load. ``download=True`` fetches the files with torchvision where they are
    missing (needs internet).
    """

    num_classes = 10
    in_channels = 1

    def __init__(
        self,
        root: str | os.PathLike[str],
        download: bool = False,
        val_images: int = 5000,
        train_subset: int | None = None,
        **loader_options: Unpack[LoaderOptions],
    ) -> None:
        super().__init__(**loader_options)
        self.root = os.path.expanduser(os.fspath(root))
        self.download = bool(download)
        self.val_images = check_int("val_images", val_images, minimum=len(CLASS_NAMES))
        self.train_subset = (
            None
            if train_subset is None
            else check_int("train_subset", train_subset, minimum=len(CLASS_NAMES))
        )
        self.class_names = list(CLASS_NAMES)
        self.split_indices: dict[str, np.ndarray] = {}
        self.mean = 0.0
        self.std = 1.0
        self.files: dict[str, tuple[str, str]] | None = None
        if not self.download:
            self.files = find_files(self.root)

    def prepare_data(self) -> None:
        if not self.download:
            return
        with contextlib.suppress(ConfigError):
            self.files = find_files(self.root)
            return
        try:
            download(self.root)
        except ConfigError as e:
            raise ConfigError(
                f"data.download=true: {e}; without internet run `make data-fashion-mnist` "
                "(Debian's dataset-fashion-mnist) or put the IDX files there"
            ) from None
        self.files = find_files(self.root)

    def _split_train(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sorted (train, val) indices into the official training set, stratified and fixed."""
        if self.val_images >= len(labels):
            raise ArgumentError(
                "val_images",
                self.val_images,
                f"{{key}}={self.val_images} leaves no training images out of {len(labels)}",
            )
        train, val = self._stratified(np.arange(len(labels)), labels, test_size=self.val_images)
        if self.train_subset is not None and self.train_subset < len(train):
            train, _ = self._stratified(train, labels, train_size=self.train_subset)
        elif self.train_subset is not None:
            raise ArgumentError(
                "train_subset",
                self.train_subset,
                f"{{key}}={self.train_subset} must be below the {len(train)} training images "
                f"left after val_images={self.val_images}",
            )
        return np.sort(train), np.sort(val)

    def _stratified(
        self, indices: np.ndarray, labels: np.ndarray, **size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """``indices`` split in two with every class in both (sklearn's ``train_test_split``); a
        DataError naming the label file when a class has fewer than 2 images to share."""
        counts = np.bincount(labels[indices], minlength=len(CLASS_NAMES))
        if counts.min() < 2:
            rare = int(counts.argmin())
            raise DataError(
                f"data.root: {self.files['train'][1]} has {counts[rare]} training image(s) of "
                f"class {rare} ({CLASS_NAMES[rare]}); the stratified split (data.val_images, "
                "data.train_subset) needs at least 2 of every class"
            )
        return train_test_split(
            indices, stratify=labels[indices], random_state=SPLIT_RANDOM_STATE, **size
        )

    def _resized(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] == self.image_size:
            return images
        return v2.functional.resize(images, [self.image_size] * 2, antialias=True)

    def _build(self) -> None:
        if self.files is None:
            self.prepare_data()
        assert self.files is not None
        train_images, train_labels = load_split(*self.files["train"])
        test_images, test_labels = load_split(*self.files["test"])
        train_images, test_images = self._resized(train_images), self._resized(test_images)

        train_idx, val_idx = self._split_train(train_labels.numpy())
        self.split_indices = {
            "train": train_idx,
            "val": val_idx,
            "test": np.arange(len(test_labels)),
        }
        train_t, val_t = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
        self.mean, self.std = pixel_mean_std(train_images[train_t])

        train_tf = None
        if self.augment:
            train_tf = v2.Compose(
                [v2.RandomCrop(self.image_size, padding=4), v2.RandomHorizontalFlip()]
            )

        def dataset(
            images: torch.Tensor, labels: torch.Tensor, transform: Callable | None
        ) -> TensorImageDataset:
            # Kept as uint8 (a quarter of float32's memory); padding fills with 0, the
            # background, before the division and normalisation.
            return TensorImageDataset(
                images.contiguous(), labels.contiguous(), self.mean, self.std, transform, 255.0
            )

        self.train_set = dataset(train_images[train_t], train_labels[train_t], train_tf)
        self.val_set = dataset(train_images[val_t], train_labels[val_t], None)
        self.test_set = dataset(test_images, test_labels, None)
