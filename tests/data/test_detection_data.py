"""Detection data: COCO-format folders (tiny fixtures from tests/data_files.py: PNGs + instances
json) and the generated digit scenes, read back through the same COCO loader."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from data_files import ann, pixels, write_split
from normlab.data import CocoDetectionDataModule, DigitScenesDataModule
from normlab.data import digit_scenes as scenes_module
from normlab.data.coco import detection_collate
from normlab.data.digits import split_indices
from normlab.errors import ConfigError, DataError
from normlab.runs import instantiate_data

# --------------------------------------------------------------------------------------------------
# COCO fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    """train: image 1 (40x80, two boxes + a crowd), image 2 (grayscale, none);
    val: image 11 (one box + a crowd); no test split."""
    root = tmp_path / "coco"
    write_split(
        root,
        "train",
        [{"id": 1, "height": 40, "width": 80}, {"id": 2, "height": 30, "width": 20, "gray": True}],
        [
            ann(1, 7, [10, 5, 30, 20], area=321.5),
            ann(1, 3, [50, 0, 30, 40]),
            ann(1, 3, [0, 0, 10, 10], iscrowd=1),
        ],
    )
    write_split(
        root,
        "val",
        [{"id": 11, "height": 50, "width": 60}],
        [ann(11, 3, [1, 2, 3, 4]), ann(11, 7, [20, 20, 10, 10], iscrowd=1)],
    )
    return root


def make(root: Path, **kwargs: Any) -> CocoDetectionDataModule:
    kwargs.setdefault("hflip", 0.0)
    kwargs.setdefault("splits", {"train": "train", "val": "val"})
    return CocoDetectionDataModule(str(root), **kwargs)


def first_with_id(dataset, image_id: int) -> tuple[torch.Tensor, dict]:
    for i in range(len(dataset)):
        image, target = dataset[i]
        if target["image_id"] == image_id:
            return image, target
    raise AssertionError(f"no image id {image_id}")


# --------------------------------------------------------------------------------------------------
# COCO loader
# --------------------------------------------------------------------------------------------------


def test_categories_known_after_init_and_mapped_in_id_order(coco_root: Path) -> None:
    dm = make(coco_root)
    assert dm.train_set is None  # nothing loaded yet, but the label set is known
    assert (dm.num_classes, dm.in_channels) == (2, 3)
    assert dm.class_names == ["dog", "cat"]
    assert dm.category_ids == [3, 7]


def test_item_format_xyxy_boxes_and_contiguous_labels(coco_root: Path) -> None:
    dm = make(coco_root)
    dm.setup("fit")
    image, target = first_with_id(dm.train_set, 1)
    assert image.dtype == torch.float32 and image.shape == (3, 40, 80)
    expected = torch.from_numpy(pixels(40, 80, 1)).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(image, expected)
    torch.testing.assert_close(
        target["boxes"], torch.tensor([[10.0, 5.0, 40.0, 25.0], [50.0, 0.0, 80.0, 40.0]])
    )
    assert target["boxes"].dtype == torch.float32
    assert target["labels"].tolist() == [1, 0] and target["labels"].dtype == torch.int64
    torch.testing.assert_close(target["area"], torch.tensor([321.5, 1200.0]))  # json area, else w*h
    assert target["iscrowd"].tolist() == [0, 0] and target["iscrowd"].dtype == torch.int64
    assert target["orig_size"] == (40, 80)


def test_image_without_annotations_is_a_sample_and_gray_becomes_rgb(coco_root: Path) -> None:
    dm = make(coco_root)
    dm.setup("fit")
    assert len(dm.train_set) == 2
    image, target = first_with_id(dm.train_set, 2)
    assert image.shape == (3, 30, 20)
    gray = torch.from_numpy(pixels(30, 20, 2, channels=1)).float() / 255
    for channel in image:
        torch.testing.assert_close(channel, gray)
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64


def test_crowd_dropped_in_train_kept_in_val(coco_root: Path) -> None:
    dm = make(coco_root)
    dm.setup()
    _, train_target = first_with_id(dm.train_set, 1)
    assert train_target["iscrowd"].sum() == 0 and len(train_target["boxes"]) == 2
    _, val_target = first_with_id(dm.val_set, 11)
    assert val_target["iscrowd"].tolist() == [0, 1]
    assert val_target["labels"].tolist() == [0, 1]
    torch.testing.assert_close(val_target["boxes"][1], torch.tensor([20.0, 20.0, 30.0, 30.0]))


def test_test_split_falls_back_to_val(coco_root: Path) -> None:
    dm = make(coco_root)
    dm.setup("test")
    assert dm.test_set is dm.val_set and len(dm.test_set) == 1
    assert dm.train_set is None  # the test stage does not parse the train json


def test_hflip_moves_boxes_to_width_minus_x(coco_root: Path) -> None:
    plain = make(coco_root, hflip=0.0)
    flipped = make(coco_root, hflip=1.0)
    plain.setup("fit")
    flipped.setup("fit")
    image, target = first_with_id(plain.train_set, 1)
    f_image, f_target = first_with_id(flipped.train_set, 1)
    width = image.shape[-1]
    x1, y1, x2, y2 = target["boxes"].unbind(1)
    expected = torch.stack([width - x2, y1, width - x1, y2], dim=1)
    torch.testing.assert_close(f_target["boxes"], expected)
    torch.testing.assert_close(f_image, image.flip(-1))
    # Evaluation splits are never flipped.
    torch.testing.assert_close(first_with_id(flipped.val_set, 11)[0], plain.val_set[0][0])


@pytest.mark.parametrize(
    ("min_sizes", "max_size", "expected_hw"),
    [([60], None, (60, 120)), ([60], 90, (45, 90)), ([20], None, (20, 40))],
)
def test_random_shortest_size_scales_boxes_with_image(
    coco_root: Path, min_sizes: list[int], max_size: int | None, expected_hw: tuple[int, int]
) -> None:
    plain = make(coco_root)
    resized = make(coco_root, train_min_sizes=min_sizes, max_size=max_size)
    plain.setup("fit")
    resized.setup("fit")
    image, target = first_with_id(plain.train_set, 1)
    r_image, r_target = first_with_id(resized.train_set, 1)
    assert tuple(r_image.shape[-2:]) == expected_hw
    scale_y = r_image.shape[-2] / image.shape[-2]
    scale_x = r_image.shape[-1] / image.shape[-1]
    scale = torch.tensor([scale_x, scale_y, scale_x, scale_y])
    torch.testing.assert_close(r_target["boxes"], target["boxes"] * scale)
    assert r_target["orig_size"] == (40, 80)  # the file's size, not the resized one


def test_loaders_collate_lists_and_shuffle_by_seed(coco_root: Path) -> None:
    dm = make(coco_root, batch_size=2)
    images, targets = next(iter(dm.train_dataloader()))
    assert isinstance(images, list) and isinstance(targets, list)
    assert len(images) == len(targets) == 2
    assert {tuple(i.shape) for i in images} == {(3, 40, 80), (3, 30, 20)}

    def order(seed: int) -> list[int]:
        loader = make(coco_root, batch_size=1, seed=seed).train_dataloader()
        return [t[0]["image_id"] for _, t in loader]

    orders = {tuple(order(seed)) for seed in range(8)}
    assert len(orders) == 2  # both orders of two images occur across seeds...
    assert order(3) == order(3)  # ...and a seed fixes one
    batch = [(torch.zeros(3, 2, 2), {"image_id": 1}), (torch.ones(3, 4, 4), {"image_id": 2})]
    images, targets = detection_collate(batch)
    assert [t["image_id"] for t in targets] == [1, 2] and images[1].shape == (3, 4, 4)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (ann(1, 3, [5, 5, 10, 0], id=918), "width or height <= 0"),
        (ann(1, 3, [5, 5, -2, 4], id=918), "width or height <= 0"),
        (ann(1, 5, [5, 5, 10, 10], id=918), "category_id not in"),
        (ann(1, 3, [100, 5, 10, 10], id=918), "outside"),
    ],
)
def test_bad_annotation_error_names_file_ids_and_fix(
    tmp_path: Path, bad: dict, reason: str
) -> None:
    write_split(tmp_path, "train", [{"id": 1, "height": 20, "width": 30}], [bad])
    write_split(tmp_path, "val", [{"id": 2, "height": 20, "width": 30}], [])
    dm = make(tmp_path)  # annotations are checked at setup, not at construction
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert str(tmp_path / "annotations" / "instances_train.json") in message
    assert "annotation id 918" in message and "image id 1" in message
    assert reason in message and "data.on_bad_sample=skip" in message
    assert isinstance(info.value, ValueError)


def test_unknown_image_id_is_a_bad_annotation(tmp_path: Path) -> None:
    write_split(tmp_path, "train", [{"id": 1, "height": 20, "width": 30}], [])
    write_split(tmp_path, "val", [{"id": 2, "height": 20, "width": 30}], [ann(99, 3, [1, 1, 2, 2])])
    with pytest.raises(DataError, match=r"image id 99.*not in the json's images"):
        make(tmp_path).setup("validate")


def test_skip_drops_images_with_bad_annotations_and_logs_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Image 2's bad boxes leave image 2 out (kept without them, its objects would read as
    # background); the annotation of an unlisted image is counted but spoils no image.
    write_split(
        tmp_path,
        "train",
        [{"id": 1, "height": 20, "width": 30}, {"id": 2, "height": 20, "width": 30}],
        [
            ann(1, 3, [1, 1, 4, 4]),
            ann(2, 3, [2, 2, 4, 4]),
            ann(2, 3, [1, 1, 0, 4]),
            ann(2, 3, [1, 1, 4, 0]),
            ann(2, 42, [1, 1, 4, 4]),
            ann(7, 3, [1, 1, 4, 4]),
        ],
    )
    write_split(tmp_path, "val", [{"id": 3, "height": 20, "width": 30}], [])
    dm = make(tmp_path, on_bad_sample="skip")
    with caplog.at_level(logging.WARNING, logger="normlab.data"):
        dm.setup("fit")
    assert len(dm.train_set) == 1
    _, target = dm.train_set[0]
    assert target["image_id"] == 1
    torch.testing.assert_close(target["boxes"], torch.tensor([[1.0, 1.0, 5.0, 5.0]]))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 1 of 2 train samples" in warnings[0]
    assert "box with width or height <= 0: 2 (annotation 102, annotation 103)" in warnings[0]
    assert "category_id not in the json's categories: 1" in warnings[0]
    assert "image_id not in the json's images: 1" in warnings[0]


def test_missing_paths_are_config_errors_naming_them(coco_root: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=rf"data.root: {missing} is not a directory"):
        make(missing)
    (coco_root / "annotations" / "instances_val.json").unlink()
    with pytest.raises(ConfigError, match=r"data.splits.val.*instances_val.json not found"):
        make(coco_root)
    with pytest.raises(ConfigError, match=r"data.splits.train.*train2017 not found"):
        make(coco_root, splits={"train": "train2017", "val": "train"})


def test_missing_image_file_is_reported_at_setup(coco_root: Path) -> None:
    (coco_root / "val" / "0011.png").unlink()
    dm = make(coco_root)
    with pytest.raises(DataError, match=r"0011.png: file missing.*1 problem\(s\)"):
        dm.setup("validate")


def test_splits_must_share_categories(coco_root: Path) -> None:
    write_split(
        coco_root, "val", [{"id": 11, "height": 5, "width": 5}], [], [{"id": 3, "name": "dog"}]
    )
    with pytest.raises(ConfigError, match="same categories"):
        make(coco_root).setup("validate")


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"on_bad_annotation": "ignore"}, "^on_bad_annotation"),
        ({"hflip": 1.5}, "^hflip"),
        ({"train_min_sizes": []}, "^train_min_sizes"),
        ({"train_min_sizes": [0]}, "^train_min_sizes"),
        ({"max_size": 100}, "^max_size"),
        ({"batch_size": 0}, "^batch_size"),
        ({"seed": "x"}, "^seed"),
        ({"splits": {"train": "train"}}, "^splits"),
        ({"splits": {"train": "train", "val": "val", "dev": "x"}}, "^splits"),
        ({"splits": {"train": "../train", "val": "val"}}, "^splits.train"),
    ],
)
def test_arguments_validated(coco_root: Path, kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        make(coco_root, **kwargs)


def test_coco_config_instantiates(coco_root: Path, compose_config) -> None:
    cfg = compose_config("data=coco", f"data.root={coco_root}", "data.splits.train=train")
    cfg.data.splits.val = "val"
    cfg.data.splits.test = "val"
    dm = instantiate_data(cfg.data)
    assert isinstance(dm, CocoDetectionDataModule)
    assert (dm.train_min_sizes, dm.max_size, dm.hflip) == ([800], 1333, 0.5)
    assert dm.class_names == ["dog", "cat"]


# --------------------------------------------------------------------------------------------------
# digit scenes
# --------------------------------------------------------------------------------------------------

TINY = {
    "num_train": 6,
    "num_val": 3,
    "num_test": 3,
    "canvas_size": 64,
    "digit_size": [12, 28],
    "max_digits": 4,
}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> DigitScenesDataModule:
    dm = DigitScenesDataModule(str(tmp_path_factory.mktemp("scenes")), **TINY)
    dm.setup()
    return dm


def _json(dm: DigitScenesDataModule, split: str) -> dict:
    return json.loads(Path(dm.split_paths(split)[1]).read_text())


def test_scenes_labels_known_without_files(tmp_path: Path) -> None:
    dm = DigitScenesDataModule(str(tmp_path), **TINY)
    assert (dm.num_classes, dm.in_channels) == (10, 3)
    assert dm.class_names == [str(d) for d in range(10)]
    assert dm.category_ids == list(range(1, 11))
    assert not (tmp_path / "digit_scenes").exists()


def test_scenes_are_deterministic(scenes: DigitScenesDataModule, tmp_path: Path) -> None:
    again = DigitScenesDataModule(str(tmp_path), **TINY)
    again.prepare_data()
    assert again.tag == scenes.tag and again.root != scenes.root
    for split in ("train", "val", "test"):
        a_dir, a_json = scenes.split_paths(split)
        b_dir, b_json = again.split_paths(split)
        assert Path(a_json).read_bytes() == Path(b_json).read_bytes()
        names = sorted(p.name for p in Path(a_dir).iterdir())
        assert names == sorted(p.name for p in Path(b_dir).iterdir())
        for name in names:
            a = np.asarray(Image.open(Path(a_dir) / name))
            b = np.asarray(Image.open(Path(b_dir) / name))
            assert a.shape == (64, 64, 3) and np.array_equal(a, b)


def test_scene_items_boxes_and_labels(scenes: DigitScenesDataModule) -> None:
    sizes = {"train": 6, "val": 3, "test": 3}
    for split, dataset in (
        ("train", scenes.train_set),
        ("val", scenes.val_set),
        ("test", scenes.test_set),
    ):
        assert len(dataset) == sizes[split]
        for i in range(len(dataset)):
            image, target = dataset[i]
            assert image.shape == (3, 64, 64) and image.min() >= 0 and image.max() <= 1
            boxes = target["boxes"]
            assert 1 <= len(boxes) <= TINY["max_digits"]
            assert (boxes >= 0).all() and (boxes <= 64).all()
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
            assert ((target["labels"] >= 0) & (target["labels"] <= 9)).all()
            # A box is the digit's ink: brighter on average than the whole canvas.
            for x1, y1, x2, y2 in boxes.int().tolist():
                assert image[0, y1:y2, x1:x2].mean() > image[0].mean()


def test_scene_labels_match_source_digits(scenes: DigitScenesDataModule) -> None:
    from sklearn.datasets import load_digits

    targets = load_digits().target
    for split in ("train", "val", "test"):
        for a in _json(scenes, split)["annotations"]:
            assert a["category_id"] == targets[a["digit_index"]] + 1
            assert a["area"] == a["bbox"][2] * a["bbox"][3]


def test_scene_splits_use_disjoint_digit_pools(scenes: DigitScenesDataModule) -> None:
    from sklearn.datasets import load_digits

    pools = split_indices(load_digits().target)
    used = {
        split: {a["digit_index"] for a in _json(scenes, split)["annotations"]}
        for split in ("train", "val", "test")
    }
    for split, indices in used.items():
        assert indices and indices <= set(pools[split].tolist())
    assert not used["train"] & used["val"] and not used["train"] & used["test"]
    assert not used["val"] & used["test"]


def test_scene_parameters_select_the_folder(scenes: DigitScenesDataModule) -> None:
    root = scenes.data_root
    same = DigitScenesDataModule(root, **TINY, batch_size=3, seed=5, hflip=0.5)
    assert same.root == scenes.root and same.is_generated  # loader options don't matter
    for change in ({"generation_seed": 1}, {"canvas_size": 72}, {"num_val": 4}):
        other = DigitScenesDataModule(root, **{**TINY, **change})
        assert other.root != scenes.root and not other.is_generated


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"digit_size": [30, 20]}, "^digit_size"),
        ({"digit_size": [20, 200]}, "^digit_size"),
        ({"digit_size": 20}, "^digit_size"),
        ({"max_digits": 0}, "^max_digits"),
        ({"num_train": 0}, "^num_train"),
        ({"generation_seed": -1}, "^generation_seed"),
        ({"hflip": -0.1}, "^hflip"),
    ],
)
def test_scene_arguments_validated(tmp_path: Path, kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        DigitScenesDataModule(str(tmp_path), **kwargs)


def test_digit_scenes_config_instantiates(compose_config, tmp_path: Path) -> None:
    cfg = compose_config(
        "data=digit_scenes", "data.num_train=2", "data.num_val=1", "data.num_test=1"
    )
    dm = instantiate_data(cfg.data)
    assert isinstance(dm, DigitScenesDataModule)
    assert dm.data_root == str(tmp_path / "data")
    assert dm.generation_params["digit_size"] == [20, 48] and dm.hflip == 0.0
    images, targets = next(iter(dm.train_dataloader()))
    assert len(images) == 2 and images[0].shape == (3, 128, 128)
    assert all(len(t["boxes"]) >= 1 for t in targets)


def test_generator_version_is_part_of_the_tag(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    before = DigitScenesDataModule(str(tmp_path), **TINY).tag
    monkeypatch.setattr(scenes_module, "GENERATOR_VERSION", scenes_module.GENERATOR_VERSION + 1)
    assert DigitScenesDataModule(str(tmp_path), **TINY).tag != before
