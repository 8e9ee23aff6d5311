"""Data modules: digits (real data, in memory), CIFAR (tiny on-disk fixture in the real python
format, parsed by torchvision's own code) and ImageFolder (a few PNGs, including grayscale/RGBA)."""

from __future__ import annotations

import pickle
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from data_files import make_cifar, write_png
from normlab.data import CIFARDataModule, DigitsDataModule, ImageFolderDataModule
from normlab.data.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES
from normlab.errors import ConfigError

# --------------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    return dm


def _labels(dataset) -> np.ndarray:
    return dataset.labels.numpy()


def test_digits_splits_are_stratified_disjoint_and_fixed(digits: DigitsDataModule) -> None:
    sizes = (digits.train_size, digits.val_size, digits.test_size)
    assert sizes == (1257, 270, 270)
    assert sum(sizes) == 1797
    idx = digits.split_indices
    assert not set(idx["train"]) & set(idx["val"])
    assert not set(idx["train"]) & set(idx["test"])
    assert not set(idx["val"]) & set(idx["test"])
    assert len(np.union1d(np.union1d(idx["train"], idx["val"]), idx["test"])) == 1797
    for ds in (digits.train_set, digits.val_set, digits.test_set):
        assert set(_labels(ds)) == set(range(10))  # every class in every split

    other = DigitsDataModule(seed=123, batch_size=7, image_size=16)
    other.setup("test")
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(idx[split], other.split_indices[split])


def test_digits_attributes_and_batches(digits: DigitsDataModule) -> None:
    assert (digits.num_classes, digits.in_channels) == (10, 1)
    assert digits.class_names == [str(d) for d in range(10)]
    for loader in (digits.train_dataloader(), digits.val_dataloader(), digits.test_dataloader()):
        x, y = next(iter(loader))
        assert x.shape == (32, 1, 32, 32) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and y.min() >= 0 and y.max() <= 9
        assert torch.isfinite(x).all()
    assert len(digits.val_dataloader().dataset) == 270  # drop_last=False: every sample seen


def test_digits_normalised_with_train_stats() -> None:
    dm = DigitsDataModule(augment=False, image_size=16, batch_size=2000)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (1257, 1, 16, 16)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    x_val, _ = next(iter(dm.val_dataloader()))
    assert x_val.shape == (270, 1, 16, 16)


def test_digits_augmentation_only_on_train() -> None:
    dm = DigitsDataModule(augment=True)
    dm.setup()
    assert dm.train_set.transform is not None
    assert dm.val_set.transform is None and dm.test_set.transform is None
    torch.manual_seed(0)
    a, _ = dm.train_set[0]
    b, _ = dm.train_set[0]
    assert not torch.equal(a, b)  # random affine jitter
    torch.testing.assert_close(dm.val_set[0][0], dm.val_set[0][0])


def _epoch_labels(dm: DigitsDataModule) -> torch.Tensor:
    return torch.cat([y for _, y in dm.train_dataloader()])


def test_digits_train_order_depends_only_on_seed() -> None:
    first = _epoch_labels(DigitsDataModule(seed=0, augment=False, batch_size=256))
    again = _epoch_labels(DigitsDataModule(seed=0, augment=False, batch_size=256))
    other = _epoch_labels(DigitsDataModule(seed=1, augment=False, batch_size=256))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert sorted(first.tolist()) == sorted(other.tolist())


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"batch_size": 0}, "^batch_size"),
        ({"eval_batch_size": 0}, "^eval_batch_size"),
        ({"num_workers": -1}, "^num_workers"),
        ({"image_size": 0}, "^image_size"),
        ({"seed": "x"}, "^seed"),
    ],
)
def test_common_kwargs_validated(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        DigitsDataModule(**kwargs)


def test_eval_batch_size_sets_only_the_val_and_test_batches() -> None:
    dm = DigitsDataModule(batch_size=2, eval_batch_size=100, augment=False)
    assert next(iter(dm.train_dataloader()))[0].shape[0] == 2
    assert next(iter(dm.val_dataloader()))[0].shape[0] == 100
    assert next(iter(dm.test_dataloader()))[0].shape[0] == 100
    default = DigitsDataModule(batch_size=2)
    assert next(iter(default.test_dataloader()))[0].shape[0] == 2


def test_digits_fast_dev_run_with_trainer() -> None:
    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 10))

        def _step(self, batch):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def training_step(self, batch, batch_idx):
            return self._step(batch)

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self._step(batch))

        def test_step(self, batch, batch_idx):
            self.log("test_loss", self._step(batch))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = DigitsDataModule(batch_size=16)
    trainer = pl.Trainer(
        fast_dev_run=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny(), datamodule=dm)
    trainer.test(Tiny(), datamodule=dm, verbose=False)


# --------------------------------------------------------------------------------------------------
# CIFAR: the real on-disk python format (pickled dicts, `data` uint8 N x 3072 in CHW order)
# --------------------------------------------------------------------------------------------------


CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
CIFAR_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)


def test_cifar10_loads_real_format(tmp_path: Path) -> None:
    written = make_cifar(tmp_path, "cifar10")
    dm = CIFARDataModule(root=str(tmp_path), val_fraction=0.25, check_integrity=False, batch_size=8)
    assert (dm.num_classes, dm.in_channels) == (10, 3)
    assert dm.class_names == CIFAR10_CLASSES
    dm.setup("fit")
    assert (dm.train_size, dm.val_size, dm.test_size) == (15, 5, 6)
    train_idx, val_idx = set(dm.train_set.indices), set(dm.val_set.indices)
    assert not train_idx & val_idx and train_idx | val_idx == set(range(20))

    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        x, y = next(iter(loader))
        assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) < 10

    # The eval pipeline is exact: un-normalising gives back the stored CHW bytes.
    x, y = dm.test_set[2]
    expected = torch.from_numpy(written["test_batch"]["data"][2].reshape(3, 32, 32)).float()
    torch.testing.assert_close((x * CIFAR_STD + CIFAR_MEAN) * 255, expected, atol=1e-3, rtol=0)
    assert y == written["test_batch"]["labels"][2]

    # The val carve-out is fixed (independent of `seed`).
    again = CIFARDataModule(root=tmp_path, val_fraction=0.25, check_integrity=False, seed=5)
    again.setup("validate")
    assert again.val_set.indices == dm.val_set.indices


def test_cifar10_train_augmentation_and_resize(tmp_path: Path) -> None:
    make_cifar(tmp_path, "cifar10")
    dm = CIFARDataModule(root=tmp_path, check_integrity=False, image_size=16, batch_size=4)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16)
    x, _ = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 3, 16, 16)


def test_cifar100_loads_real_format(tmp_path: Path) -> None:
    written = make_cifar(tmp_path, "cifar100")
    dm = CIFARDataModule(
        root=tmp_path, variant="cifar100", check_integrity=False, val_fraction=0.2, batch_size=32
    )
    assert dm.num_classes == 100 and dm.class_names == CIFAR100_CLASSES
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32)
    assert set(y.tolist()) <= set(written["train"]["fine_labels"])
    x, y = next(iter(dm.test_dataloader()))
    assert y.tolist() == written["test"]["fine_labels"]


def test_cifar100_class_names_constant() -> None:
    assert len(CIFAR100_CLASSES) == len(set(CIFAR100_CLASSES)) == 100
    assert sorted(CIFAR100_CLASSES) == CIFAR100_CLASSES  # the official order is alphabetical


def test_cifar_md5_mismatch_is_config_error(tmp_path: Path) -> None:
    make_cifar(tmp_path, "cifar10")
    dm = CIFARDataModule(root=tmp_path)  # check_integrity=True: the fixture's md5s differ
    with pytest.raises(ConfigError, match=r"data\.check_integrity=false"):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("variant", "folder"), [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")]
)
def test_cifar_missing_root(tmp_path: Path, variant: str, folder: str) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(ConfigError) as info:
        CIFARDataModule(root=str(root), variant=variant)
    message = str(info.value)
    assert str(root / folder) in message and "data.download=true" in message


def test_cifar_missing_file_named(tmp_path: Path) -> None:
    make_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(ConfigError, match="data_batch_3"):
        CIFARDataModule(root=tmp_path, check_integrity=False)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"variant": "cifar1000"}, "^variant"),
        ({"val_fraction": 0.0}, "^val_fraction"),
        ({"val_fraction": 1.5}, "^val_fraction"),
    ],
)
def test_cifar_bad_kwargs(tmp_path: Path, kwargs: dict, key: str) -> None:
    make_cifar(tmp_path, "cifar10")
    with pytest.raises(ConfigError, match=key):
        CIFARDataModule(root=tmp_path, check_integrity=False, **kwargs)


# --------------------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------------------


def make_folder_tree(root: Path, splits: tuple[str, ...] = ("train", "val")) -> None:
    modes = ["RGB", "L", "RGBA"]
    for s, split in enumerate(splits):
        for c, cls in enumerate(("cat", "dog")):
            for i, mode in enumerate(modes):
                size = (40 + 7 * i, 30 + 5 * c)  # varied, non-square sizes
                write_png(
                    root / split / cls / f"{mode}_{i}.png", mode, size, seed=100 * s + 10 * c + i
                )


def test_image_folder_loads_mixed_modes(tmp_path: Path) -> None:
    make_folder_tree(tmp_path)
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=24, batch_size=4)
    assert dm.class_names == ["cat", "dog"]
    assert (dm.num_classes, dm.in_channels) == (2, 3)
    dm.setup("fit")
    assert (dm.train_size, dm.val_size, dm.test_size) == (6, 6, 6)
    assert dm.test_set is dm.val_set  # no test/ folder
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        batches = list(loader)
        assert [len(y) for _, y in batches] == [4, 2]  # drop_last=False
        for x, y in batches:
            assert x.shape[1:] == (3, 24, 24) and x.dtype == torch.float32
            assert y.dtype == torch.int64 and set(y.tolist()) <= {0, 1}


def test_image_folder_uses_test_folder_when_present(tmp_path: Path) -> None:
    make_folder_tree(tmp_path, ("train", "val", "test"))
    dm = ImageFolderDataModule(root=tmp_path, image_size=16, augment=False)
    dm.setup("test")
    assert dm.test_set is not dm.val_set
    x, _ = next(iter(dm.test_dataloader()))
    assert x.shape == (6, 3, 16, 16)


def test_image_folder_missing_val(tmp_path: Path) -> None:
    make_folder_tree(tmp_path, ("train",))
    with pytest.raises(ConfigError) as info:
        ImageFolderDataModule(root=tmp_path)
    assert str(tmp_path / "val") in str(info.value)


def test_image_folder_missing_root(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope"):
        ImageFolderDataModule(root=tmp_path / "nope")


def test_image_folder_class_mismatch(tmp_path: Path) -> None:
    make_folder_tree(tmp_path)
    write_png(tmp_path / "val" / "bird" / "x.png", "RGB", (8, 8), seed=0)
    with pytest.raises(ConfigError) as info:
        ImageFolderDataModule(root=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "train") in message and str(tmp_path / "val") in message
    assert "bird" in message


def test_image_folder_with_one_class_is_refused(tmp_path: Path) -> None:
    for split in ("train", "val"):
        write_png(tmp_path / split / "cat" / "a.png", "RGB", (8, 8), seed=0)
    with pytest.raises(ConfigError, match=r"train has one class folder \(cat\); a classifier"):
        ImageFolderDataModule(root=tmp_path)


def test_image_folder_empty_class_folder(tmp_path: Path) -> None:
    make_folder_tree(tmp_path)
    (tmp_path / "train" / "eel").mkdir()
    (tmp_path / "val" / "eel").mkdir()
    dm = ImageFolderDataModule(root=tmp_path)
    with pytest.raises(ConfigError, match="eel"):
        dm.setup("fit")


def test_datasets_pickle_for_spawned_workers(tmp_path: Path) -> None:
    make_cifar(tmp_path / "c", "cifar10")
    make_folder_tree(tmp_path / "f")
    modules = [
        DigitsDataModule(),
        CIFARDataModule(root=tmp_path / "c", check_integrity=False),
        ImageFolderDataModule(root=tmp_path / "f"),
    ]
    for dm in modules:
        dm.setup()
        for ds in (dm.train_set, dm.val_set, dm.test_set):
            clone = pickle.loads(pickle.dumps(ds))
            assert len(clone) == len(ds)
            assert clone[0][0].shape == ds[0][0].shape
