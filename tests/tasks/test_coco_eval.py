"""Detection evaluation equals pycocotools' COCOeval on the annotations as the json has them,
and normlab.eval's detections json is in COCO's results format."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# The tests' own COCO writer (tests/ is on sys.path: it holds the root conftest.py).
from data_files import CATEGORIES, ann, write_split
from normlab.data import CocoDetectionDataModule
from normlab.tasks.detection import MAP_BACKENDS, _eval_targets, build_map_metric, coco_results

CATEGORY_IDS = sorted(c["id"] for c in CATEGORIES)  # contiguous label → json category id


def _box(x: float, y: float, w: float, h: float, **extra: object) -> dict:
    return {"bbox": [x, y, w, h], "area": w * h, **extra}


@pytest.fixture
def edge_root(tmp_path: Path) -> Path:
    """val: three 64x96 images; image 12's first box reaches 12 px past the right edge (x 80..108
    in a 96-px image), image 13 has a crowd region. The train split only exists for the layout."""
    train = [{"id": 1, "height": 32, "width": 32}]
    write_split(tmp_path, "train", train, [ann(1, 3, [2, 2, 10, 10], area=100.0)])
    images = [{"id": i, "height": 64, "width": 96} for i in (11, 12, 13)]
    boxes = [
        ann(11, 3, **_box(10, 8, 30, 20)),
        ann(11, 7, **_box(50, 30, 20, 25)),
        ann(12, 7, **_box(80, 10, 28, 30)),  # past the edge
        ann(12, 3, **_box(5, 5, 16, 16)),
        ann(13, 3, **_box(20, 20, 40, 30)),
        ann(13, 3, **_box(60, 0, 30, 30, iscrowd=1)),
    ]
    write_split(tmp_path, "val", images, boxes)
    return tmp_path


def _detections(image_ids: list[int]) -> list[dict[str, torch.Tensor]]:
    """Near-misses, the edge box as a detector sees it (clipped to the image), a wrong class,
    false alarms and a detection inside the crowd region; contiguous labels (3 → 0, 7 → 1)."""
    per_image = {
        11: [([11, 9, 41, 27], 0.9, 0), ([52, 31, 71, 57], 0.8, 1), ([0, 40, 20, 60], 0.3, 1)],
        12: [([80, 10, 96, 40], 0.95, 1), ([5, 6, 20, 21], 0.6, 0), ([30, 30, 50, 50], 0.4, 0)],
        13: [([21, 19, 59, 51], 0.7, 0), ([62, 2, 80, 20], 0.5, 0), ([20, 20, 60, 50], 0.2, 1)],
    }
    detections = []
    for image_id in image_ids:
        boxes, scores, labels = zip(*per_image[image_id], strict=True)
        detections.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32),
                "scores": torch.tensor(scores, dtype=torch.float32),
                "labels": torch.tensor(labels, dtype=torch.int64),
            }
        )
    return detections


def _cocoeval(json_path: Path, results: list[dict]) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(json_path))
        evaluator = COCOeval(ground_truth, ground_truth.loadRes(results), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


@pytest.mark.parametrize("backend", MAP_BACKENDS)
def test_evaluation_uses_the_json_boxes_and_equals_cocoeval(edge_root: Path, backend: str):
    datamodule = CocoDetectionDataModule(
        edge_root, splits={"train": "train", "val": "val"}, hflip=0.0, batch_size=2
    )
    datamodule.setup("validate")
    metric = build_map_metric(backend)
    image_ids = []
    for _, targets in datamodule.val_dataloader():
        ids = [t["image_id"] for t in targets]
        metric.update(_detections(ids), _eval_targets(targets))
        image_ids += ids
    ours = metric.compute()

    # The same detections, scored by COCOeval against the json file itself.
    expected = _cocoeval(
        edge_root / "annotations" / "instances_val.json",
        coco_results(image_ids, _detections(image_ids), CATEGORY_IDS),
    )
    names = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large"]
    for index, name in enumerate(names):
        assert float(ours[name]) == pytest.approx(expected[index], abs=1e-4), name
    assert float(ours["mar_100"]) == pytest.approx(expected[8], abs=1e-4)
    # Not trivial: the edge box's detection overlaps its json box by 16/28 < 0.75.
    assert 0.2 < expected[0] < 0.9


def test_training_still_clips_boxes_to_the_image(edge_root: Path):
    datamodule = CocoDetectionDataModule(
        edge_root, splits={"train": "val", "val": "val"}, hflip=0.0, batch_size=1
    )
    datamodule.setup("fit")
    train = {t["image_id"]: t for _, t in (datamodule.train_set[i] for i in range(3))}
    val = {t["image_id"]: t for _, t in (datamodule.val_set[i] for i in range(3))}
    torch.testing.assert_close(train[12]["boxes"][0], torch.tensor([80.0, 10.0, 96.0, 40.0]))
    torch.testing.assert_close(val[12]["boxes"][0], torch.tensor([80.0, 10.0, 108.0, 40.0]))


def test_coco_results_use_the_json_ids_and_xywh_boxes():
    detections = [
        {
            "boxes": torch.tensor([[1.0, 2.0, 11.0, 22.0]]),
            "scores": torch.tensor([0.5]),
            "labels": torch.tensor([1]),
        }
    ]
    results = coco_results([42], detections, [3, 7])
    assert results == [
        {"image_id": 42, "category_id": 7, "bbox": [1.0, 2.0, 10.0, 20.0], "score": 0.5}
    ]
    json.dumps(results)  # plain Python values only
