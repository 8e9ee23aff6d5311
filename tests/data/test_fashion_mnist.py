"""Fashion-MNIST: the IDX reader and data module on tiny IDX fixtures written here (CI needs no
download and no Debian package), bad files, ``make data-fashion-mnist``'s steps, the two
experiment recipes, and (slow) the real files when they are installed."""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

import normlab.data.fashion_mnist as fashion_mnist
import normlab.data.fetch_fashion_mnist as fetch
from cli import REPO_ROOT
from normlab.data import FashionMNISTDataModule
from normlab.data.fashion_mnist import IMAGES_MAGIC, LABELS_MAGIC, read_idx
from normlab.data.samplers import SeededSamples
from normlab.errors import ConfigError, DataError
from normlab.runs import exit_on_config_error
from normlab.train import train

PER_CLASS_TRAIN = 12
PER_CLASS_TEST = 3
SIDE = 28


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    """``array`` (uint8) as an IDX file: big-endian magic, one int32 per dimension, the bytes;
    gzip-compressed when the name ends in ``.gz``."""
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def fixture_arrays(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose row 0 holds the sample's own id (so a served sample can be traced back) on a
    background of label-dependent noise; labels cycle through the 10 classes."""
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(10, dtype=np.uint8), per_class)
    images = rng.integers(0, 40, (len(labels), SIDE, SIDE), dtype=np.uint8)
    images[:, 4:24, 4:24] += (labels * 20)[:, None, None].astype(np.uint8)
    images[:, 0, 0] = np.arange(len(labels)) % 256
    images[:, 0, 1] = np.arange(len(labels)) // 256
    return images, labels


def build_fashion(folder: Path, *, gz: bool = True) -> dict[str, np.ndarray]:
    """The four files in ``folder`` (created); returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    train_images, train_labels = fixture_arrays(PER_CLASS_TRAIN, seed=0)
    test_images, test_labels = fixture_arrays(PER_CLASS_TEST, seed=1)
    write_idx(folder / f"train-images-idx3-ubyte{ext}", train_images, IMAGES_MAGIC)
    write_idx(folder / f"train-labels-idx1-ubyte{ext}", train_labels, LABELS_MAGIC)
    write_idx(folder / f"t10k-images-idx3-ubyte{ext}", test_images, IMAGES_MAGIC)
    write_idx(folder / f"t10k-labels-idx1-ubyte{ext}", test_labels, LABELS_MAGIC)
    return {"train": train_images, "train_labels": train_labels, "test": test_images}


def tiny(root: Path, **kwargs) -> FashionMNISTDataModule:
    options = {"val_images": 20, "image_size": SIDE, "batch_size": 8, **kwargs}
    dm = FashionMNISTDataModule(root, **options)
    dm.setup()
    return dm


def sample_ids(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()).tolist()


# --------------------------------------------------------------------------------------------------
# Reading and splitting
# --------------------------------------------------------------------------------------------------


def test_torchvision_layout_gzip_and_flat_plain_files_read_the_same(tmp_path: Path) -> None:
    written = build_fashion(tmp_path / "tv" / "FashionMNIST" / "raw", gz=True)
    build_fashion(tmp_path / "flat", gz=False)
    a, b = tiny(tmp_path / "tv"), tiny(tmp_path / "flat")
    for split in ("train_set", "val_set", "test_set"):
        assert torch.equal(getattr(a, split).images, getattr(b, split).images)
        assert torch.equal(getattr(a, split).labels, getattr(b, split).labels)
    assert a.test_set.images.dtype == torch.uint8  # decoded once, kept as bytes
    assert torch.equal(a.test_set.images[:, 0], torch.from_numpy(written["test"]))
    assert (a.train_size, a.val_size, a.test_size) == (100, 20, 30)


def test_val_split_is_stratified_disjoint_and_the_same_for_every_seed(tmp_path: Path) -> None:
    build_fashion(tmp_path)
    dm = tiny(tmp_path)
    train, val = dm.split_indices["train"], dm.split_indices["val"]
    assert not set(train) & set(val) and len(set(train) | set(val)) == 10 * PER_CLASS_TRAIN
    assert np.bincount(dm.val_set.labels.numpy()).tolist() == [2] * 10
    assert np.bincount(dm.train_set.labels.numpy()).tolist() == [10] * 10
    other = tiny(tmp_path, seed=123)
    for split in ("train", "val"):
        np.testing.assert_array_equal(dm.split_indices[split], other.split_indices[split])
    assert sample_ids(dm.val_set.images) == sorted(val.tolist())


def test_train_subset_is_stratified_fixed_and_drawn_from_train(tmp_path: Path) -> None:
    build_fashion(tmp_path)
    full, subset = tiny(tmp_path), tiny(tmp_path, train_subset=50)
    assert subset.train_size == 50
    assert np.bincount(subset.train_set.labels.numpy()).tolist() == [5] * 10
    assert set(subset.split_indices["train"]) < set(full.split_indices["train"])
    np.testing.assert_array_equal(subset.split_indices["val"], full.split_indices["val"])
    again = tiny(tmp_path, train_subset=50, seed=7)
    np.testing.assert_array_equal(subset.split_indices["train"], again.split_indices["train"])
    with pytest.raises(ConfigError, match=r"^train_subset=100 must be below the 100"):
        tiny(tmp_path, train_subset=100)
    with pytest.raises(ConfigError, match=r"^train_subset must be an integer >= 10"):
        FashionMNISTDataModule(tmp_path, train_subset=3)


def test_a_class_with_one_training_image_is_named_not_a_traceback(tmp_path: Path) -> None:
    written = build_fashion(tmp_path, gz=False)
    labels = written["train_labels"].copy()
    labels[labels == 3] = 4
    labels[np.flatnonzero(written["train_labels"] == 3)[0]] = 3  # one image of class 3 left
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, LABELS_MAGIC)
    with pytest.raises(DataError) as refused:
        tiny(tmp_path)
    assert str(refused.value) == (
        f"data.root: {tmp_path / 'train-labels-idx1-ubyte'} has 1 training image(s) of class 3 "
        "(Dress); the stratified split (data.val_images, data.train_subset) needs at least 2 of "
        "every class"
    )


def test_normalised_with_the_training_split_statistics(tmp_path: Path) -> None:
    build_fashion(tmp_path)
    dm = tiny(tmp_path, augment=False, batch_size=1000)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (100, 1, SIDE, SIDE) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1.0) < 1e-3
    raw = dm.train_set.images.double() / 255
    assert dm.mean == pytest.approx(float(raw.mean())) and dm.std == pytest.approx(float(raw.std()))


def test_image_size_resizes_once_at_load(tmp_path: Path) -> None:
    build_fashion(tmp_path)
    dm = tiny(tmp_path, image_size=32)
    assert dm.train_set.images.shape[-2:] == (32, 32) and dm.train_set.images.dtype == torch.uint8
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 32, 32)


def _padded_crops_and_flips(image: torch.Tensor) -> list[torch.Tensor]:
    padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
    crops = [padded[:, i : i + SIDE, j : j + SIDE] for i in range(9) for j in range(9)]
    return crops + [c.flip(-1) for c in crops]


def test_augmentation_is_a_padded_crop_and_flip_of_train_samples_only(tmp_path: Path) -> None:
    build_fashion(tmp_path)
    dm = tiny(tmp_path)
    image = dm.train_set.images[0]
    seen = []
    for seed in range(40):
        torch.manual_seed(seed)
        seen.append(dm.train_set.transform(image))
    for out in seen:
        assert any(torch.equal(out, c) for c in _padded_crops_and_flips(image))
    assert len({tuple(o.flatten().tolist()) for o in seen}) > 10  # not one fixed view
    assert any(not torch.equal(o, image) for o in seen)
    assert dm.val_set.transform is None and dm.test_set.transform is None
    assert tiny(tmp_path, augment=False).train_set.transform is None


def test_training_batches_depend_on_seed_and_epoch_only(tmp_path: Path) -> None:
    """Exact resume: an epoch's samples and their augmentation do not depend on the global RNG,
    and resuming mid-epoch serves the rest of the very same batches."""
    build_fashion(tmp_path)

    def epoch_batches(epoch: int, global_seed: int, skip: int = 0) -> list[torch.Tensor]:
        dm = tiny(tmp_path, seed=5)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip_next(skip)
        torch.manual_seed(global_seed)
        return [x for x, _ in loader]

    first = epoch_batches(1, global_seed=0)
    assert all(
        torch.equal(a, b) for a, b in zip(first, epoch_batches(1, global_seed=99), strict=True)
    )
    resumed = epoch_batches(1, global_seed=3, skip=16)  # two batches of 8 already trained on
    assert len(resumed) == len(first) - 2
    assert all(torch.equal(a, b) for a, b in zip(first[2:], resumed, strict=True))
    assert not torch.equal(first[0], epoch_batches(2, global_seed=0)[0])


def test_seeded_samples_draw_what_torch_manual_seed_draws_and_restore_the_rng(
    tmp_path: Path,
) -> None:
    """SeededSamples seeds only the CPU generator (cheaply): the augmentation a seed gives is the
    one ``torch.manual_seed(seed)`` gives, and the global stream goes on untouched."""
    build_fashion(tmp_path)
    dm = tiny(tmp_path)
    seeded = SeededSamples(dm.train_set)
    torch.manual_seed(1234)
    expected = dm.train_set[3][0]
    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert torch.equal(seeded[(3, 1234)][0], expected)
    assert torch.equal(torch.get_rng_state(), before)


# --------------------------------------------------------------------------------------------------
# Missing and bad files
# --------------------------------------------------------------------------------------------------


def test_missing_files_are_a_config_error_naming_the_root(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"data.root: no Fashion-MNIST IDX files .* run `make data-fashion-mnist`"
    ):
        FashionMNISTDataModule(tmp_path)
    build_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(
        ConfigError, match=rf"{re.escape(str(tmp_path))} lacks t10k-labels-idx1-ubyte \(plain"
    ):
        FashionMNISTDataModule(tmp_path)


def _wrong_magic(folder: Path) -> Path:
    path = folder / "train-images-idx3-ubyte.gz"
    write_idx(path, fixture_arrays(PER_CLASS_TRAIN, 0)[0], LABELS_MAGIC + 0x100)
    return path


def _truncated(folder: Path) -> Path:
    path = folder / "t10k-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-100]))
    return path


def _too_long(folder: Path) -> Path:
    path = folder / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()) + b"\x00"))
    return path


def _cut_gzip(folder: Path) -> Path:
    path = folder / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    return path


def _count_mismatch(folder: Path) -> Path:
    path = folder / "train-labels-idx1-ubyte.gz"
    write_idx(path, fixture_arrays(PER_CLASS_TRAIN, 0)[1][:-1], LABELS_MAGIC)
    return folder / "train-images-idx3-ubyte.gz"


def _label_out_of_range(folder: Path) -> Path:
    path = folder / "t10k-labels-idx1-ubyte.gz"
    labels = fixture_arrays(PER_CLASS_TEST, 1)[1]
    labels[7] = 10
    write_idx(path, labels, LABELS_MAGIC)
    return path


BAD_FILES = {
    "wrong_magic": (_wrong_magic, r"magic number 0x00000901, expected 0x00000803"),
    "truncated": (_truncated, r"is truncated: the header announces 30×28×28 = 23520 bytes"),
    "too_long": (_too_long, r"is longer than its header says"),
    "cut_gzip": (_cut_gzip, r"is not a readable gzip file"),
    "count_mismatch": (_count_mismatch, r"holds 120 images but .* holds 119 labels"),
    "label_out_of_range": (_label_out_of_range, r"row 7 has label 10, outside 0..9"),
}


@pytest.mark.parametrize("case", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_file_is_a_data_error_naming_it(case, tmp_path: Path) -> None:
    break_file, problem = case
    build_fashion(tmp_path)
    path = break_file(tmp_path)
    with pytest.raises(DataError, match=rf"data.root: {re.escape(str(path))} .*{problem}"):
        tiny(tmp_path)


def test_read_idx_reads_what_was_written(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    write_idx(tmp_path / "a", array, IMAGES_MAGIC)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "a"), IMAGES_MAGIC), array)


def test_bad_file_stops_a_run_with_one_line(compose_config, fast, tmp_path, capsys, monkeypatch):
    root = tmp_path / "fashion"
    build_fashion(root)
    path = _truncated(root)
    monkeypatch.setenv("NORMLAB_RUN_CONFIG", "")
    cfg = compose_config("experiment=fashion_cpu", f"data.root={root}", *fast)
    with pytest.raises(SystemExit) as exit_info:
        try:
            train(cfg)
        except Exception as error:
            exit_on_config_error(error)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if "configuration error" in line]
    assert len(lines) == 1 and str(path) in lines[0] and "truncated" in lines[0]


def test_download_without_internet_is_one_line(tmp_path: Path, monkeypatch) -> None:
    def offline(*args, **kwargs):
        print("Downloading http://example.invalid/train-images-idx3-ubyte.gz")
        raise RuntimeError(
            "Error downloading train-images-idx3-ubyte.gz:\nTried http://example.invalid/, got:\n"
            "<urlopen error [Errno -2] Name or service not known>\n"
        )

    monkeypatch.setattr(fashion_mnist, "FashionMNIST", offline)
    dm = FashionMNISTDataModule(tmp_path, download=True)
    with pytest.raises(ConfigError) as error:
        dm.prepare_data()
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("data.download=true: downloading Fashion-MNIST into")
    assert "Name or service not known" in message and "make data-fashion-mnist" in message


def test_download_is_skipped_when_the_files_are_there(tmp_path: Path, monkeypatch) -> None:
    build_fashion(tmp_path)
    monkeypatch.setattr(fashion_mnist, "FashionMNIST", lambda *a, **k: pytest.fail("downloaded"))
    assert tiny(tmp_path, download=True).test_size == 30


# --------------------------------------------------------------------------------------------------
# make data-fashion-mnist
# --------------------------------------------------------------------------------------------------


def test_fetch_uses_files_already_there(tmp_path: Path, monkeypatch, capsys) -> None:
    build_fashion(tmp_path / "FashionMNIST" / "raw")
    monkeypatch.setattr(fetch, "package_files", lambda: pytest.fail("looked for the package"))
    assert fetch.main(["--root", str(tmp_path)]) == 0
    assert "using 120 training and 30 test images" in capsys.readouterr().out


def test_fetch_names_a_bad_file_already_there(tmp_path: Path, capsys) -> None:
    build_fashion(tmp_path)
    path = _wrong_magic(tmp_path)
    assert fetch.main(["--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "magic number" in err


def test_fetch_links_the_installed_package(tmp_path: Path, monkeypatch, capsys) -> None:
    package = tmp_path / "usr" / "share" / "datasets" / "fashion-mnist"
    build_fashion(package)
    files = {p.name: str(p) for p in package.iterdir()}
    monkeypatch.setattr(fetch, "package_files", lambda: files)
    monkeypatch.setattr(fetch, "apt_install", lambda: pytest.fail("ran apt-get"))
    root = tmp_path / "data"
    assert fetch.main(["--root", str(root)]) == 0
    raw = root / "FashionMNIST" / "raw"
    assert sorted(os.listdir(raw)) == sorted(files)
    assert all(os.readlink(raw / name) == path for name, path in files.items())
    assert "linked dataset-fashion-mnist's files" in capsys.readouterr().out
    assert tiny(root).test_size == 30


def test_fetch_installs_the_package_when_it_can(tmp_path: Path, monkeypatch) -> None:
    package = tmp_path / "package"

    def package_files() -> dict[str, str] | None:
        return {p.name: str(p) for p in package.iterdir()} if package.exists() else None

    def apt_install() -> None:
        build_fashion(package)

    monkeypatch.setattr(fetch, "package_files", package_files)
    monkeypatch.setattr(fetch, "apt_install", apt_install)
    monkeypatch.setattr(fetch, "download", lambda root: pytest.fail("downloaded"))
    assert fetch.main(["--root", str(tmp_path / "data")]) == 0
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    assert os.readlink(raw / "t10k-images-idx3-ubyte.gz") == str(
        package / "t10k-images-idx3-ubyte.gz"
    )


def test_fetch_says_what_it_tried_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    def offline(root: str) -> None:
        raise ConfigError(f"downloading Fashion-MNIST into {root} failed (no network)")

    monkeypatch.setattr(fetch, "package_files", lambda: None)
    monkeypatch.setattr(fetch, "apt_install", lambda: "not root")
    monkeypatch.setattr(fetch, "download", offline)
    assert fetch.main(["--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    for step in (
        f"no IDX files in {tmp_path / 'FashionMNIST' / 'raw'} or {tmp_path}",
        "Debian package dataset-fashion-mnist not installed",
        "apt-get install dataset-fashion-mnist: not root",
        "failed (no network)",
    ):
        assert step in err


# --------------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------------


def test_densenet_fashion_is_the_published_recipe(compose_config) -> None:
    cfg = compose_config("experiment=densenet_fashion")
    assert cfg.model._target_ == "normlab.models.densenet_bc_100"
    assert cfg.norm.name == "bn" and cfg.data._target_.endswith("FashionMNISTDataModule")
    assert cfg.data.batch_size == 64 and cfg.data.augment and cfg.data.image_size == 28
    assert cfg.trainer.max_epochs == 300
    opt = cfg.task.optimizer
    assert opt._target_ == "torch.optim.SGD"
    assert (opt.lr, opt.momentum, opt.nesterov, opt.weight_decay) == (0.1, 0.9, True, 1e-4)
    assert cfg.task.decay_norm_and_bias
    sched = cfg.task.scheduler
    assert sched._target_ == "normlab.tasks.optim.warmup_multistep"
    assert list(sched.milestones) == [0.5, 0.75] and sched.gamma == 0.1
    assert sched.warmup_steps == 0

    # The schedule those values give: ÷10 at epochs 150 and 225 of 300 (860 steps an epoch).
    steps = 860
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=opt.lr)
    factor = instantiate(sched)(optimizer, total_steps=300 * steps).lr_lambdas[0]
    lr = {epoch: opt.lr * factor(epoch * steps) for epoch in (0, 150, 225, 299)}
    assert lr == pytest.approx({0: 0.1, 150: 0.01, 225: 0.001, 299: 0.001})
    assert opt.lr * factor(150 * steps - 1) == pytest.approx(0.1)
    assert opt.lr * factor(225 * steps - 1) == pytest.approx(0.01)


def test_densenet_fashion_runs_one_batch(compose_config, tmp_path: Path) -> None:
    root = tmp_path / "fashion"
    build_fashion(root / "FashionMNIST" / "raw")
    cfg = compose_config(
        "experiment=densenet_fashion",
        "debug=fdr",
        f"data.root={root}",
        "data.val_images=20",
        "data.batch_size=8",
        "logger=csv",
        "callbacks.progress_bar=null",
    )
    metrics = train(cfg)
    assert np.isfinite(metrics["train/loss"]) and 0.0 <= metrics["test/acc"] <= 1.0


def test_fashion_cpu_recipe(compose_config) -> None:
    cfg = compose_config("experiment=fashion_cpu")
    assert cfg.model._target_ == "normlab.models.densenet_bc" and cfg.model.depth == 40
    assert cfg.norm.name == "bn" and cfg.data._target_.endswith("FashionMNISTDataModule")
    assert cfg.data.train_subset is None and cfg.data.val_images == 5000


# --------------------------------------------------------------------------------------------------
# The real files
# --------------------------------------------------------------------------------------------------

REAL_ROOT = Path(os.environ.get("FASHION_MNIST_ROOT", REPO_ROOT / "data"))


@pytest.mark.slow
@pytest.mark.skipif(
    not any(
        (folder / "train-images-idx3-ubyte.gz").exists()
        or (folder / "train-images-idx3-ubyte").exists()
        for folder in (REAL_ROOT, REAL_ROOT / "FashionMNIST" / "raw")
    ),
    reason=f"no Fashion-MNIST files under {REAL_ROOT} (make data-fashion-mnist)",
)
def test_real_files() -> None:
    dm = FashionMNISTDataModule(REAL_ROOT, image_size=28)
    dm.setup()
    labels = {s: getattr(dm, f"{s}_set").labels.numpy() for s in ("train", "val", "test")}
    assert len(labels["train"]) + len(labels["val"]) == 60_000 and len(labels["test"]) == 10_000
    assert np.bincount(np.concatenate([labels["train"], labels["val"]])).tolist() == [6000] * 10
    assert np.bincount(labels["test"]).tolist() == [1000] * 10
    assert np.bincount(labels["val"]).tolist() == [500] * 10
    assert dm.train_set.images.shape == (55_000, 1, 28, 28)
    # The published statistics of the 60,000 training images: mean 0.2860, std 0.3530.
    assert dm.mean == pytest.approx(0.286, abs=2e-3) and dm.std == pytest.approx(0.353, abs=2e-3)
