"""Paired (pix2pix "aligned") data: tiny A|B fixtures (tests/data_files.py), and the generated
digit pairs read back through the same loader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image
from sklearn.datasets import load_digits

from data_files import HALF, STEP, pattern_half, write_pair
from normlab.data import AlignedDataModule, DigitPairsDataModule
from normlab.data import digit_pairs as pairs_module
from normlab.data.aligned import AlignedDataset
from normlab.data.digits import split_indices
from normlab.errors import ConfigError
from normlab.runs import instantiate_data
from normlab.utils.hydra_run import CONFIG_DIR

# --------------------------------------------------------------------------------------------------
# aligned fixtures
# --------------------------------------------------------------------------------------------------


def scaled(values: np.ndarray) -> torch.Tensor:
    """uint8 values as the loader scales them: [0, 255] → [-1, 1]."""
    return torch.from_numpy(values.astype(np.float32)) / 127.5 - 1.0


@pytest.fixture
def aligned_root(tmp_path: Path) -> Path:
    """train: 3 pairs, val: 2 pairs (one a JPEG), no test/."""
    root = tmp_path / "pairs"
    for i in range(3):
        write_pair(root / "train" / f"{i}.png", shift=i)
    write_pair(root / "val" / "a.png", shift=5)
    Image.open(root / "val" / "a.png").convert("RGB").save(root / "val" / "b.jpg", quality=95)
    return root


def make(root: Path, **kwargs: Any) -> AlignedDataModule:
    kwargs.setdefault("load_size", HALF)
    kwargs.setdefault("crop_size", HALF)
    return AlignedDataModule(str(root), **kwargs)


# --------------------------------------------------------------------------------------------------
# aligned loader
# --------------------------------------------------------------------------------------------------


def test_halves_split_by_direction_and_scaled_to_unit_range(aligned_root: Path) -> None:
    for direction, (a_marker, b_marker) in (("AtoB", (-1.0, 1.0)), ("BtoA", (1.0, -1.0))):
        dm = make(aligned_root, direction=direction)
        assert (dm.in_channels, dm.out_channels, dm.image_size) == (3, 3, HALF)
        dm.setup("validate")
        item = dm.val_set[0]
        assert item["path"] == str(aligned_root / "val" / "a.png")
        for key, marker in (("A", a_marker), ("B", b_marker)):
            image = item[key]
            assert image.dtype == torch.float32 and image.shape == (3, HALF, HALF)
            assert image.min() >= -1.0 and image.max() <= 1.0
            assert (image[2] == marker).all()  # the marker channel says which half this is
            # Sizes equal: no resampling, so pixels are exactly the file's, scaled.
            torch.testing.assert_close(
                image[:2], scaled(pattern_half(0, 5)[..., :2]).permute(2, 0, 1)
            )


def test_train_crop_and_flip_take_the_same_window_from_both_halves(aligned_root: Path) -> None:
    crop = 24
    dm = make(aligned_root, crop_size=crop, flip=True)
    dm.setup("fit")
    full = scaled(pattern_half(0, 0)[..., :2]).permute(2, 0, 1)
    offsets, flips = set(), set()
    torch.manual_seed(0)
    for _ in range(40):
        item = dm.train_set[0]  # shift 0: the pattern is the plain coordinates
        a, b = item["A"], item["B"]
        assert a.shape == b.shape == (3, crop, crop)
        torch.testing.assert_close(a[:2], b[:2])  # same window, same orientation
        assert (a[2] == -1).all() and (b[2] == 1).all()
        flipped = bool(a[0, 0, 0] > a[0, 0, -1])
        window = a[:2].flip(-1) if flipped else a[:2]
        # The first row/column values locate the window in the original half.
        x = round((float(window[0, 0, 0]) + 1) * 127.5 / STEP)
        y = round((float(window[1, 0, 0]) + 1) * 127.5 / STEP)
        torch.testing.assert_close(window, full[:, y : y + crop, x : x + crop])
        offsets.add((x, y))
        flips.add(flipped)
    assert len(offsets) > 10 and flips == {True, False}


def test_train_resizes_to_load_size_before_cropping(aligned_root: Path) -> None:
    dm = make(aligned_root, load_size=64, crop_size=48, flip=False)
    dm.setup("fit")
    item = dm.train_set[1]
    assert item["A"].shape == item["B"].shape == (3, 48, 48)
    torch.testing.assert_close(item["A"][:2], item["B"][:2])


def test_eval_split_is_deterministic_and_crop_sized(aligned_root: Path) -> None:
    dm = make(aligned_root, load_size=64, crop_size=32, flip=True)
    dm.setup("validate")
    assert len(dm.val_set) == 2
    for index in range(2):
        torch.manual_seed(index)
        first = dm.val_set[index]
        torch.manual_seed(100 + index)
        second = dm.val_set[index]
        assert first["A"].shape == first["B"].shape == (3, 32, 32)
        torch.testing.assert_close(first["A"], second["A"])
        torch.testing.assert_close(first["B"], second["B"])
    # The whole half resized to crop_size (no crop: a crop would drop part of the picture).
    half = Image.fromarray(pattern_half(0, 5)).resize((32, 32), Image.Resampling.BICUBIC)
    expected = scaled(np.asarray(half)).permute(2, 0, 1)
    torch.testing.assert_close(dm.val_set[0]["A"], expected)


def test_grayscale_channels(aligned_root: Path) -> None:
    dm = make(aligned_root, in_channels=1, out_channels=3)
    assert (dm.in_channels, dm.out_channels) == (1, 3)
    dm.setup("validate")
    item = dm.val_set[0]
    assert item["A"].shape == (1, HALF, HALF) and item["B"].shape == (3, HALF, HALF)
    left = Image.open(aligned_root / "val" / "a.png").crop((0, 0, HALF, HALF)).convert("L")
    torch.testing.assert_close(item["A"][0], scaled(np.asarray(left)))


def test_test_split_falls_back_to_val(aligned_root: Path) -> None:
    dm = make(aligned_root)
    dm.setup("test")
    assert dm.test_set is dm.val_set and len(dm.test_set) == 2
    assert dm.train_set is None  # the test stage does not list the train files
    write_pair(aligned_root / "test" / "t.png")
    own = make(aligned_root)
    own.setup("test")
    assert [Path(p).name for p in own.test_set.paths] == ["t.png"]


def test_loaders_stack_dicts_and_shuffle_by_seed(aligned_root: Path) -> None:
    dm = make(aligned_root, batch_size=2)
    batch = next(iter(dm.train_dataloader()))
    assert batch["A"].shape == batch["B"].shape == (2, 3, HALF, HALF)
    assert isinstance(batch["path"], list) and len(batch["path"]) == 2

    def order(seed: int) -> list[str]:
        loader = make(aligned_root, batch_size=1, seed=seed).train_dataloader()
        return [Path(b["path"][0]).name for b in loader]

    orders = {tuple(order(seed)) for seed in range(6)}
    assert len(orders) > 1 and order(3) == order(3)
    val = next(iter(dm.val_dataloader()))
    assert [Path(p).name for p in val["path"]] == ["a.png", "b.jpg"]  # eval: sorted, unshuffled


def test_odd_width_file_stops_setup_naming_it(aligned_root: Path) -> None:
    bad = aligned_root / "train" / "odd.png"
    Image.fromarray(np.zeros((HALF, 2 * HALF + 1, 3), dtype=np.uint8)).save(bad)
    dm = make(aligned_root)  # files are checked when a split is loaded
    with pytest.raises(ConfigError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert str(bad) in message and "81x40" in message
    assert "two equal halves side by side" in message and "even" in message
    # The item reader checks again (a file can change after setup).
    with pytest.raises(ValueError, match=r"odd\.png"):
        AlignedDataset([str(bad)], load_size=HALF, crop_size=HALF)[0]


def test_unreadable_and_empty_splits_are_config_errors(aligned_root: Path) -> None:
    (aligned_root / "train" / "junk.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match=r"cannot read .*junk.png"):
        make(aligned_root).setup("fit")
    for path in (aligned_root / "val").iterdir():
        path.unlink()
    with pytest.raises(ConfigError, match=rf"no images .* in {aligned_root / 'val'}"):
        make(aligned_root).setup("validate")


def test_missing_folders_are_config_errors_naming_them(aligned_root: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=rf"data.root: {missing} is not a directory"):
        make(missing)
    for path in (aligned_root / "val").iterdir():
        path.unlink()
    (aligned_root / "val").rmdir()
    with pytest.raises(ConfigError, match=rf"val folder {aligned_root / 'val'} not found"):
        make(aligned_root)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"direction": "AB"}, r"^direction must be one of \['AtoB', 'BtoA'\]"),
        ({"load_size": 30, "crop_size": 32}, r"^load_size \(30\) must be >= crop_size \(32\)"),
        ({"crop_size": 0}, "^crop_size"),
        ({"in_channels": 2}, r"^in_channels must be one of \[1, 3\]"),
        ({"out_channels": True}, "^out_channels"),
        ({"flip": "yes"}, "^flip"),
        ({"batch_size": 0}, "^batch_size"),
        ({"num_workers": -1}, "^num_workers"),
        ({"seed": 1.5}, "^seed"),
    ],
)
def test_arguments_validated(aligned_root: Path, kwargs: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        make(aligned_root, **kwargs)


def test_facades_config_composes_and_reads_btoa(aligned_root: Path) -> None:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("config", overrides=["data=facades", f"data.root={aligned_root}"])
    finally:
        GlobalHydra.instance().clear()
    assert cfg.data._target_ == "normlab.data.AlignedDataModule"
    assert cfg.data.direction == "BtoA"
    assert (cfg.data.load_size, cfg.data.crop_size, cfg.data.flip) == (286, 256, True)
    assert (cfg.data.batch_size, cfg.data.in_channels, cfg.data.out_channels) == (1, 3, 3)
    cfg.data.load_size = cfg.data.crop_size = HALF
    dm = instantiate_data(cfg.data)
    dm.setup("validate")
    assert (dm.val_set[0]["A"][2] == 1).all()  # BtoA: the input is the right half


# --------------------------------------------------------------------------------------------------
# digit pairs
# --------------------------------------------------------------------------------------------------

TINY = {"num_train": 6, "num_val": 3, "num_test": 3}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> DigitPairsDataModule:
    dm = DigitPairsDataModule(str(tmp_path_factory.mktemp("pairs")), **TINY)
    dm.setup()
    return dm


def test_pairs_shapes_known_without_files(tmp_path: Path) -> None:
    dm = DigitPairsDataModule(str(tmp_path), **TINY)
    assert (dm.in_channels, dm.out_channels, dm.image_size) == (1, 1, 64)
    assert (dm.load_size, dm.crop_size, dm.flip, dm.direction) == (72, 64, False, "AtoB")
    assert not (tmp_path / "digit_pairs").exists()


def test_pairs_are_deterministic(pairs: DigitPairsDataModule, tmp_path: Path) -> None:
    again = DigitPairsDataModule(str(tmp_path), **TINY)
    again.prepare_data()
    assert again.tag == pairs.tag and again.root != pairs.root
    files = sorted(p.relative_to(pairs.root) for p in Path(pairs.root).rglob("*") if p.is_file())
    assert len(files) == 12 + 2  # the PNGs, the manifest and the marker
    assert files == sorted(
        p.relative_to(again.root) for p in Path(again.root).rglob("*") if p.is_file()
    )
    for name in files:
        assert (Path(pairs.root) / name).read_bytes() == (Path(again.root) / name).read_bytes()


def test_pair_items_outline_and_digit(pairs: DigitPairsDataModule) -> None:
    sizes = {"train": 6, "val": 3, "test": 3}
    for split, dataset in (
        ("train", pairs.train_set),
        ("val", pairs.val_set),
        ("test", pairs.test_set),
    ):
        assert len(dataset) == sizes[split]
        for i in range(len(dataset)):
            item = dataset[i]
            a, b = item["A"], item["B"]
            assert a.shape == b.shape == (1, 64, 64)
            assert a.min() >= -1 and b.max() <= 1 and b.max() > -0.5  # some bright ink
            if split == "train":
                continue  # jittered; the checks below need the exact files
            # A is an outline at one brightness (the stroke's), on or right next to B's ink.
            values = a.unique()
            assert len(values) == 2 and values[0] == -1.0 and values[1] > -0.5
            # ...that brightness being the stroke's: B's brightest ink pixel is (nearly) as bright.
            assert float(b.max()) <= float(values[1]) + 1e-6
            assert float(b.max()) >= float(values[1]) - 0.1
            near_ink = F.max_pool2d((b > -1).float()[None], 3, stride=1, padding=1)[0]
            assert (near_ink[a > 0] == 1).all()
            # ...and it is hollow: the brightest stroke pixels (the strokes' cores) are off it.
            core = b >= b.max() - 0.1 * (b.max() + 1)
            assert core.any() and (a[core] < 0).float().mean() > 0.9


def test_pairs_use_disjoint_digit_pools(pairs: DigitPairsDataModule) -> None:
    targets = load_digits().target
    pools = split_indices(targets)
    manifest = pairs.manifest()
    used = {}
    for split, entries in manifest.items():
        names = sorted(Path(p).name for p in getattr(pairs, f"{split}_set").paths)
        assert names == sorted(e["file"] for e in entries)
        for entry in entries:
            assert entry["file"].endswith(f"_d{entry['digit_index']:04d}.png")
            assert entry["label"] == targets[entry["digit_index"]]
        used[split] = {e["digit_index"] for e in entries}
        assert len(used[split]) == TINY[f"num_{split}"]  # no repeats within a split
        assert used[split] <= set(pools[split].tolist())
    assert not used["train"] & used["val"] and not used["train"] & used["test"]
    assert not used["val"] & used["test"]


def test_pair_parameters_select_the_folder(pairs: DigitPairsDataModule) -> None:
    root = pairs.data_root
    same = DigitPairsDataModule(
        root, **TINY, batch_size=2, seed=5, flip=True, load_size=80, in_channels=3
    )
    assert same.root == pairs.root and same.is_generated  # loader options don't matter
    same.setup("validate")
    assert same.val_set[0]["A"].shape == (3, 64, 64)  # gray files replicated to RGB
    for change in ({"generation_seed": 1}, {"image_size": 48, "crop_size": 48}, {"num_val": 4}):
        other = DigitPairsDataModule(root, **{**TINY, **change})
        assert other.root != pairs.root and not other.is_generated


def test_pair_counts_default_to_whole_pools(tmp_path: Path) -> None:
    sizes = {split: len(pool) for split, pool in split_indices(load_digits().target).items()}
    default = DigitPairsDataModule(str(tmp_path))
    params = default.generation_params
    assert [params[f"num_{s}"] for s in ("train", "val", "test")] == [1257, 270, 270]
    assert sizes == {"train": 1257, "val": 270, "test": 270}
    assert DigitPairsDataModule(str(tmp_path), num_train=1257).tag == default.tag
    with pytest.raises(ConfigError, match=r"^num_val must be <= 270"):
        DigitPairsDataModule(str(tmp_path), num_val=271)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"num_train": 0}, "^num_train"),
        ({"image_size": 8}, "^image_size"),
        ({"generation_seed": -1}, "^generation_seed"),
        ({"direction": "both"}, "^direction"),
    ],
)
def test_pair_arguments_validated(tmp_path: Path, kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        DigitPairsDataModule(str(tmp_path), **kwargs)


def test_generator_version_is_part_of_the_tag(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    before = DigitPairsDataModule(str(tmp_path), **TINY).tag
    monkeypatch.setattr(pairs_module, "GENERATOR_VERSION", pairs_module.GENERATOR_VERSION + 1)
    assert DigitPairsDataModule(str(tmp_path), **TINY).tag != before


def test_digit_pairs_config_instantiates(compose_config, tmp_path: Path) -> None:
    cfg = compose_config(
        "data=digit_pairs", "data.num_train=4", "data.num_val=2", "data.num_test=2"
    )
    dm = instantiate_data(cfg.data)
    assert isinstance(dm, DigitPairsDataModule)
    assert dm.data_root == str(tmp_path / "data")
    assert (dm.load_size, dm.crop_size, dm.flip, dm.batch_size) == (72, 64, False, 8)
    batch = next(iter(dm.train_dataloader()))
    assert batch["A"].shape == batch["B"].shape == (4, 1, 64, 64)
    params = json.loads((Path(dm.root) / "params.json").read_text())
    assert params == dm.generation_params
