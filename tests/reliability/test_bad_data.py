"""Broken samples in every data module that reads files (``data.on_bad_sample: raise | skip``):
each kind of bad data, injected into one training sample of a tiny fixture in the real format,
raises a DataError naming it under ``raise`` and, under ``skip``, is left out of what the training
loader serves, counted, and summed up in one log line."""

from __future__ import annotations

import json
import logging
import os
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

# The fixture builders of the data tests (tests/ is on sys.path: it holds the root conftest.py).
from data_files import HALF, ann, dump_pickle, make_cifar, write_pair, write_png, write_split
from normlab.data import (
    AlignedDataModule,
    CIFARDataModule,
    CocoDetectionDataModule,
    DigitPairsDataModule,
    DigitScenesDataModule,
    ImageFolderDataModule,
)
from normlab.data.bad_samples import SkipUndecodable
from normlab.data.imagefolder import rgb_loader
from normlab.errors import ConfigError, DataError
from normlab.utils.hydra_run import CONFIG_DIR

CLASSES = ("c0", "c1", "c2", "c3")
COCO_IMAGES = (1, 2, 3, 4)  # train image ids; files 0001.png..0004.png, annotation ids 100..103
PAIRS = ("0.png", "1.png", "2.png", "3.png")

# --------------------------------------------------------------------------------------------------
# Good fixtures: four training samples each, and a small val split
# --------------------------------------------------------------------------------------------------


def build_imagefolder(root: Path) -> None:
    """One image per class, so the label the loader serves tells which file it read."""
    for split in ("train", "val"):
        for k, name in enumerate(CLASSES):
            write_png(root / split / name / "img.png", "RGB", (12, 10), seed=k)


def build_cifar(root: Path) -> None:
    make_cifar(root, "cifar10", per_batch=4, n_test=6)  # 20 training samples, 4 per batch file


def build_coco(root: Path) -> None:
    images = [{"id": i, "height": 20, "width": 30} for i in COCO_IMAGES]
    write_split(root, "train", images, [ann(i, 3, [2, 2, 8, 8]) for i in COCO_IMAGES])
    write_split(root, "val", [{"id": 11, "height": 20, "width": 30}], [ann(11, 7, [1, 1, 5, 5])])


def build_aligned(root: Path) -> None:
    for i, name in enumerate(PAIRS):
        write_pair(root / "train" / name, shift=i)
    write_pair(root / "val" / "v.png")


def make_module(module: str, root: Path, **kwargs: Any) -> Any:
    if module == "imagefolder":
        return ImageFolderDataModule(root, image_size=8, augment=False, batch_size=2, **kwargs)
    if module == "cifar":
        return CIFARDataModule(root, check_integrity=False, val_fraction=0.25, **kwargs)
    if module == "coco":
        splits = {"train": "train", "val": "val"}
        return CocoDetectionDataModule(root, splits=splits, hflip=0.0, batch_size=2, **kwargs)
    return AlignedDataModule(root, load_size=HALF, crop_size=HALF, batch_size=2, **kwargs)


BUILD: dict[str, Callable[[Path], None]] = {
    "imagefolder": build_imagefolder,
    "cifar": build_cifar,
    "coco": build_coco,
    "aligned": build_aligned,
}


def served(module: str, dm: Any) -> list[str]:
    """What one epoch of the training loader serves, as the names the cases use: class (one file
    each), image id, pair file; for CIFAR the sample indices of the train and val subsets."""
    seen: list[str] = []
    for batch in dm.train_dataloader():
        if module == "imagefolder":
            seen += [dm.class_names[label] for label in batch[1].tolist()]
        elif module == "cifar":
            assert int(batch[1].max()) < 10
        elif module == "coco":
            seen += [f"image {target['image_id']}" for target in batch[1]]
        else:
            seen += [Path(path).name for path in batch["path"]]
    if module == "cifar":
        seen = [f"sample {i}" for i in dm.train_set.indices + dm.val_set.indices]
    return seen


# --------------------------------------------------------------------------------------------------
# Ways to spoil one training sample
# --------------------------------------------------------------------------------------------------


def not_an_image(path: Path) -> None:
    path.write_bytes(b"this is not an image")


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def with_annotation(root: Path, ann_id: int, **changes: Any) -> None:
    path = root / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    for entry in data["annotations"]:
        if entry["id"] == ann_id:
            entry.update(changes)
    path.write_text(json.dumps(data))


def with_cifar_label(root: Path, batch: str, row: int, label: int) -> None:
    path = root / "cifar-10-batches-py" / batch
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    entry["labels"][row] = label
    dump_pickle(path, entry)


def odd_width(path: Path) -> None:
    Image.fromarray(np.zeros((HALF, 2 * HALF + 1, 3), dtype=np.uint8)).save(path)


def resized(path: Path) -> None:
    Image.fromarray(np.zeros((20, 31, 3), dtype=np.uint8)).save(path)


@dataclass(frozen=True)
class Case:
    module: str
    kind: str
    spoil: Callable[[Path], None]
    # All in the error (raise); the first (file or annotation) and the last (the reason) also in
    # the summary line (skip).
    named: tuple[str, ...]
    absent: str  # what the training loader must no longer serve under skip (as `served` names it)
    at_decode: bool = False  # only found when the file is decoded, not from its header at setup
    skippable: bool = True  # False: raises under skip as well


CASES = [
    Case("imagefolder", "not an image", lambda r: not_an_image(r / "train/c1/img.png"),
         ("c1/img.png", "not a readable image"), "c1"),
    Case("imagefolder", "truncated", lambda r: truncate(r / "train/c1/img.png"),
         ("c1/img.png", "truncated"), "c1", at_decode=True),
    Case("cifar", "label out of range", lambda r: with_cifar_label(r, "data_batch_2", 1, 10),
         ("data_batch_2 row 1", "outside 0..9", "label out of range"), "sample 5"),
    Case("cifar", "truncated batch file",
         lambda r: truncate(r / "cifar-10-batches-py/data_batch_3"),
         ("data_batch_3", "not a readable CIFAR-10 batch file"), "", skippable=False),
    Case("cifar", "corrupt batch file",
         lambda r: not_an_image(r / "cifar-10-batches-py/data_batch_3"),
         ("data_batch_3", "not a readable CIFAR-10 batch file"), "", skippable=False),
    Case("coco", "not an image", lambda r: not_an_image(r / "train/0002.png"),
         ("0002.png", "not a readable image"), "image 2"),
    Case("coco", "truncated", lambda r: truncate(r / "train/0002.png"),
         ("0002.png", "cannot decode"), "image 2", at_decode=True),
    Case("coco", "missing file", lambda r: (r / "train/0002.png").unlink(),
         ("0002.png", "file missing"), "image 2"),
    Case("coco", "size differs from json", lambda r: resized(r / "train/0002.png"),
         ("0002.png", "31x20 (WxH) but", "image size differs from the json"), "image 2"),
    Case("coco", "box entirely outside", lambda r: with_annotation(r, 101, bbox=[40, 2, 8, 8]),
         ("annotation 101", "box entirely outside its image"), "image 2"),
    Case("coco", "zero-size box", lambda r: with_annotation(r, 101, bbox=[2, 2, 8, 0]),
         ("annotation 101", "box with width or height <= 0"), "image 2"),
    Case("coco", "negative-size box", lambda r: with_annotation(r, 101, bbox=[2, 2, -3, 8]),
         ("annotation 101", "box with width or height <= 0"), "image 2"),
    Case("coco", "unknown category", lambda r: with_annotation(r, 101, category_id=5),
         ("annotation 101", "category_id not in the json's categories"), "image 2"),
    Case("aligned", "not an image", lambda r: not_an_image(r / "train/1.png"),
         ("1.png", "not a readable image"), "1.png"),
    Case("aligned", "truncated", lambda r: truncate(r / "train/1.png"),
         ("1.png", "truncated"), "1.png", at_decode=True),
    Case("aligned", "odd width", lambda r: odd_width(r / "train/1.png"),
         ("1.png", "81x40 (WxH)", "odd width"), "1.png"),
]  # fmt: skip


@pytest.mark.parametrize("mode", ["raise", "skip"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.module}-{c.kind.replace(' ', '_')}")
def test_bad_sample(
    case: Case, mode: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    BUILD[case.module](tmp_path)
    case.spoil(tmp_path)
    dm = make_module(case.module, tmp_path, on_bad_sample=mode)

    if mode == "raise" or not case.skippable:
        with pytest.raises(DataError) as info:
            dm.setup("fit")
            if case.at_decode:
                served(case.module, dm)
        message = str(info.value)
        assert all(text in message for text in case.named), message
        return

    with caplog.at_level(logging.INFO, logger="normlab.data"):
        dm.setup("fit")
        seen = served(case.module, dm)
        dm.teardown("fit")
    assert case.absent not in seen
    summaries = [r.getMessage() for r in caplog.records if r.name == "normlab.data.bad_samples"]
    if case.at_decode:
        # Replaced by the next sample when read: the epoch keeps its length.
        assert len(seen) == len(dm.train_set) == 4
        assert dm.train_set.undecodable_files() == [str(tmp_path / "train" / case.named[0])]
        summary = [line for line in summaries if "could not be decoded" in line]
        assert len(summary) == 1 and "replaced 1 of 4 train samples" in summary[0]
        assert case.named[0] in summary[0]
        return
    total = 20 if case.module == "cifar" else 4
    assert dm.bad_samples["train"].skipped == 1
    assert len(seen) == total - 1
    assert len(summaries) == 1 and f"skipped 1 of {total} train samples" in summaries[0]
    name, reason = case.named[0], case.named[-1]
    assert f"{reason}: 1 ({name})" in summaries[0], summaries[0]


class _RunsCommand:
    """What a malicious pickle holds: unpickling it calls os.system."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


@pytest.mark.parametrize(
    ("name", "key"), [("data_batch_3", "data"), ("batches.meta", "label_names")]
)
def test_a_cifar_file_that_would_run_code_is_refused_unrun(name: str, key: str, tmp_path: Path):
    build_cifar(tmp_path)
    marker = tmp_path / "payload_ran"
    path = tmp_path / "cifar-10-batches-py" / name
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")  # the test's own fixture
    entry[key] = _RunsCommand(f"touch {marker}")
    dump_pickle(path, entry)
    with pytest.raises(ConfigError) as info:
        make_module("cifar", tmp_path).setup("fit")  # the meta file is read when it is built
    message = str(info.value)
    assert f"data.root: {path} is not a readable CIFAR-10" in message
    assert f"it names {os.system.__module__}.system" in message and "\n" not in message
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# Not bad: clipped boxes and other image modes
# --------------------------------------------------------------------------------------------------


def test_boxes_partly_outside_are_clipped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    build_coco(tmp_path)
    with_annotation(tmp_path, 101, bbox=[-4, 15, 10, 10])  # image 2 is 30x20
    dm = make_module("coco", tmp_path)
    with caplog.at_level(logging.INFO, logger="normlab.data"):
        dm.setup("fit")
    assert len(dm.train_set) == 4
    _, target = next(dm.train_set[i] for i in range(4) if dm.train_set[i][1]["image_id"] == 2)
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.0, 15.0, 6.0, 20.0]]))
    lines = [r.getMessage() for r in caplog.records if "clipped" in r.getMessage()]
    assert len(lines) == 1 and "clipped 1 train boxes" in lines[0] and "101" in lines[0]


def _modes(path: Path) -> dict[str, tuple[Image.Image, np.ndarray]]:
    """The same 10x12 picture saved as L, RGBA, P (with per-index alpha) and 16-bit L, with
    the RGB pixels each should read as."""
    rgb = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    rgba = np.concatenate([rgb, np.full((10, 12, 1), 128, np.uint8)], axis=2)
    palette = Image.fromarray(rgb).convert("P")
    wide = gray.astype(np.uint16) * 257  # 16 bits, same picture
    files = {
        "L": (Image.fromarray(gray), np.repeat(gray[..., None], 3, axis=2)),
        "RGBA": (Image.fromarray(rgba), rgb),
        "P": (palette, np.asarray(palette.convert("RGB"))),
        "I;16": (Image.fromarray(wide), np.repeat(gray[..., None], 3, axis=2)),
    }
    for name, (image, _) in files.items():
        options = {"transparency": bytes([0, 128] + [255] * 254)} if name == "P" else {}
        image.save(path / f"{name.replace(';', '')}.png", **options)
    return files


def test_grayscale_alpha_palette_and_16_bit_images_are_converted(tmp_path: Path) -> None:
    for name, (_, expected) in _modes(tmp_path).items():
        path = tmp_path / f"{name.replace(';', '')}.png"
        coco = tmp_path / "coco"
        write_split(coco, "val", [{"id": 1, "height": 10, "width": 12}], [])
        write_split(coco, "train", [{"id": 1, "height": 10, "width": 12}], [])
        (coco / "train" / "0001.png").write_bytes(path.read_bytes())
        dm = make_module("coco", coco)
        dm.setup("fit")
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # e.g. PIL on palette transparency
            # ImageFolder (PIL) and COCO (torchvision's decoder) read each as the same RGB.
            np.testing.assert_array_equal(np.asarray(rgb_loader(str(path))), expected, name)
            image, _ = dm.train_set[0]
        np.testing.assert_allclose(image.permute(1, 2, 0).numpy() * 255, expected, atol=1e-3)


def test_aligned_halves_are_converted_to_the_channels_asked_for(tmp_path: Path) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (HALF, 2 * HALF, 3), dtype=np.uint8)
    sources = {
        "rgba.png": Image.fromarray(np.concatenate([rgb, np.full_like(rgb[..., :1], 9)], axis=2)),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "gray.png": Image.fromarray(rgb).convert("L"),
        "rgb.png": Image.fromarray(rgb),
    }
    for name, image in sources.items():
        (tmp_path / "train").mkdir(exist_ok=True)
        image.save(tmp_path / "train" / name)
    (tmp_path / "val").mkdir()
    write_pair(tmp_path / "val" / "v.png")
    for channels, mode in ((3, "RGB"), (1, "L")):  # 1: what digit_pairs reads
        dm = make_module(
            "aligned", tmp_path, in_channels=channels, out_channels=channels, flip=False
        )
        dm.setup("fit")
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            items = {Path(dm.train_set.paths[i]).name: dm.train_set[i] for i in range(4)}
        for name, image in sources.items():
            expected = np.asarray(image.convert("RGB").convert(mode), dtype=np.float32)
            if mode == "L":
                expected = expected[..., None]
            expected = torch.from_numpy(expected / 127.5 - 1.0).permute(2, 0, 1)
            a, b = items[name]["A"], items[name]["B"]
            assert a.shape == b.shape == (channels, HALF, HALF)
            torch.testing.assert_close(torch.cat([a, b], dim=2), expected)


# --------------------------------------------------------------------------------------------------
# The option itself
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", sorted(BUILD))
def test_on_bad_sample_is_validated(module: str, tmp_path: Path) -> None:
    BUILD[module](tmp_path)
    with pytest.raises(ConfigError, match=r"^on_bad_sample must be one of \['raise', 'skip'\]"):
        make_module(module, tmp_path, on_bad_sample="ignore")
    assert make_module(module, tmp_path).on_bad_sample == "raise"


def test_generated_modules_pass_on_bad_sample_on(tmp_path: Path) -> None:
    # Neither generates files in __init__.
    assert DigitPairsDataModule(tmp_path, on_bad_sample="skip").on_bad_sample == "skip"
    assert DigitScenesDataModule(tmp_path, on_bad_sample="skip").on_bad_sample == "skip"
    with pytest.raises(ConfigError, match=r"^on_bad_sample"):
        DigitScenesDataModule(tmp_path, on_bad_sample="error")


def test_on_bad_annotation_is_a_deprecated_alias(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    build_coco(tmp_path)
    with caplog.at_level(logging.WARNING, logger="normlab.data"):
        assert make_module("coco", tmp_path, on_bad_annotation="skip").on_bad_sample == "skip"
        assert make_module("coco", tmp_path, on_bad_annotation="error").on_bad_sample == "raise"
    assert "on_bad_annotation is deprecated; use on_bad_sample=" in caplog.text
    with pytest.raises(
        ConfigError, match=r"^on_bad_annotation=error contradicts on_bad_sample=skip"
    ):
        make_module("coco", tmp_path, on_bad_sample="skip", on_bad_annotation="error")


def test_file_reading_data_configs_declare_on_bad_sample() -> None:
    declared = {}
    for path in sorted((CONFIG_DIR / "data").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        target = config.get("_target_", "")
        # digits: in memory, no files; fashion_mnist: one IDX archive per split, read whole, so a
        # bad file stops the run (tests/data/test_fashion_mnist.py) and there is no sample to skip.
        if target and not target.endswith(("DigitsDataModule", "FashionMNISTDataModule")):
            declared[path.stem] = config.get("on_bad_sample")
    assert set(declared) == {
        "aligned", "cifar10", "cifar100", "coco", "digit_pairs", "digit_scenes", "imagefolder"
    }  # fmt: skip
    assert set(declared.values()) == {"raise"}


def test_loader_workers_report_undecodable_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    build_aligned(tmp_path)
    truncate(tmp_path / "train" / "1.png")
    dm = make_module("aligned", tmp_path, on_bad_sample="skip", num_workers=2)
    dm.setup("fit")
    assert isinstance(dm.train_set, SkipUndecodable)
    names = [Path(p).name for batch in dm.train_dataloader() for p in batch["path"]]
    assert len(names) == 4 and "1.png" not in names
    with caplog.at_level(logging.WARNING, logger="normlab.data"):
        dm.teardown("fit")  # the failure was met in a worker process; the flag is shared
    assert "replaced 1 of 4 train samples that could not be decoded" in caplog.text
    assert str(tmp_path / "train" / "1.png") in caplog.text
