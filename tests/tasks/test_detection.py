"""Detection task end to end: COCO mAP against pycocotools, every norm through Hydra, dashboards."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from normlab.collect.wandb_runs import read_offline_run
from normlab.eval import evaluate
from normlab.tasks.detection import MAP_BACKENDS, build_map_metric
from normlab.train import train


def _fixed_predictions_and_targets() -> tuple[list[dict], list[dict]]:
    """Seeded boxes of all COCO size ranges, crowd regions, an image with no ground truth and an
    image with no predictions; predictions are jittered ground truth plus random false alarms."""
    rng = np.random.default_rng(0)
    predictions, targets = [], []
    for image in range(12):
        count = 0 if image == 3 else int(rng.integers(1, 7))
        sides = rng.choice([12.0, 60.0, 150.0], size=(count, 1)) * rng.uniform(0.7, 1.3, (count, 2))
        corner = rng.uniform(0, 300, (count, 2))
        # Quarter-pixel coordinates: exact in float32, so xyxy→xywh loses nothing on either side.
        boxes = np.round(np.concatenate([corner, corner + sides], axis=1) * 4) / 4
        labels = rng.integers(0, 4, count)
        crowd = (rng.uniform(size=count) < 0.1).astype(np.int64)
        area = np.round(sides.prod(axis=1) * rng.uniform(0.5, 1.0, count))  # segment < box
        targets.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(labels, dtype=torch.int64),
                "iscrowd": torch.tensor(crowd),
                "area": torch.tensor(area, dtype=torch.float32),
            }
        )
        if image == 7:
            predictions.append(
                {
                    "boxes": torch.zeros(0, 4),
                    "scores": torch.zeros(0),
                    "labels": torch.zeros(0, dtype=torch.int64),
                }
            )
            continue
        jitter = rng.normal(0, 0.08, boxes.shape) * np.concatenate([sides, sides], axis=1)
        false_corner = rng.uniform(0, 300, (3, 2))
        false_boxes = np.concatenate([false_corner, false_corner + rng.uniform(10, 100, (3, 2))], 1)
        all_boxes = np.concatenate([boxes + jitter, false_boxes]).reshape(-1, 4)
        all_boxes = np.round(all_boxes * 4) / 4
        all_boxes[:, 2:] = np.maximum(all_boxes[:, 2:], all_boxes[:, :2] + 1)
        flipped = np.where(rng.uniform(size=count) < 0.2, (labels + 1) % 4, labels)
        predictions.append(
            {
                "boxes": torch.tensor(all_boxes, dtype=torch.float32),
                "scores": torch.tensor(rng.uniform(0.05, 1, len(all_boxes)), dtype=torch.float32),
                "labels": torch.tensor(
                    np.concatenate([flipped, rng.integers(0, 4, 3)]), dtype=torch.int64
                ),
            }
        )
    return predictions, targets


def _cocoeval_stats(predictions: list[dict], targets: list[dict]) -> np.ndarray:
    """The 12 COCOeval summary numbers, computed by pycocotools from a json built by hand."""
    images, annotations, detections = [], [], []
    for image_id, (prediction, target) in enumerate(zip(predictions, targets, strict=True)):
        images.append({"id": image_id, "width": 640, "height": 640})
        for box, label, crowd, area in zip(
            target["boxes"].tolist(),
            target["labels"].tolist(),
            target["iscrowd"].tolist(),
            target["area"].tolist(),
            strict=True,
        ):
            x0, y0, x1, y1 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": area,
                    "iscrowd": crowd,
                }
            )
        for box, score, label in zip(
            prediction["boxes"].tolist(),
            prediction["scores"].tolist(),
            prediction["labels"].tolist(),
            strict=True,
        ):
            x0, y0, x1, y1 = box
            detections.append(
                {
                    "image_id": image_id,
                    "category_id": label,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": score,
                }
            )
    ground_truth = COCO()
    ground_truth.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": str(i)} for i in range(4)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth.createIndex()
        evaluator = COCOeval(ground_truth, ground_truth.loadRes(detections), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


@pytest.mark.parametrize("backend", MAP_BACKENDS)
def test_map_equals_pycocotools_cocoeval(backend: str) -> None:
    predictions, targets = _fixed_predictions_and_targets()
    expected = _cocoeval_stats(predictions, targets)
    metric = build_map_metric(backend)
    # Two updates, as two validation batches would do.
    metric.update(predictions[:5], targets[:5])
    metric.update(predictions[5:], targets[5:])
    got = metric.compute()
    names = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large"]
    for index, name in enumerate(names):
        assert float(got[name]) == pytest.approx(expected[index], abs=1e-6), name
    assert float(got["mar_100"]) == pytest.approx(expected[8], abs=1e-6)
    # The fixture is not trivial: some but not all detections are right.
    assert 0.2 < expected[1] < 0.95 and expected[3] > 0 and expected[5] > 0


def test_map_backend_is_checked() -> None:
    from normlab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^map_backend='coco'.*faster_coco_eval, pycocotools"):
        build_map_metric("coco")


@pytest.fixture(scope="module")
def scenes_root(tmp_path_factory) -> Path:
    """One data dir for the module: the tiny digit scenes are generated once."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def tiny_scenes(scenes_root: Path) -> list[str]:
    return [
        "experiment=retinanet_digits",
        f"data.root={scenes_root}",
        "data.num_train=16",
        "data.num_val=8",
        "data.num_test=8",
        "data.batch_size=4",
        "callbacks.model_summary=null",
        "callbacks.progress_bar=null",
    ]


@pytest.mark.parametrize(
    "overrides",
    [
        ["norm=bn"],
        ["norm=syncbn"],
        ["norm=gn"],
        ["norm=frozen_bn"],
        ["norm=ln"],
        ["norm=in"],
        ["norm=none"],
        ["norm=cuda_bn"],
        ["norm=bn", "model.head_norm=null"],  # v1 heads (the experiment's default: gn)
        ["norm=gn", "model.head_norm={name:gn,num_groups:16}"],
    ],
    ids=lambda o: ",".join(o),
)
def test_fast_dev_run_detects_with_every_norm(compose_config, tiny_scenes, overrides):
    cfg = compose_config(*tiny_scenes, "debug=fdr", "logger=csv", *overrides)
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss"])
    assert math.isfinite(metrics["train/loss_cls"]) and math.isfinite(metrics["train/loss_box"])
    assert -1.0 <= metrics["test/map_50"] <= 1.0


def test_short_detection_run_logs_boxes_metrics_and_checkpoints(compose_config, tiny_scenes):
    cfg = compose_config(
        *tiny_scenes,
        "logger=many",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=1",
        "task.num_logged_images=3",
        # Untrained scores sit near the prior: show every detection so that boxes get logged.
        "task.display_score_thresh=0.0",
        "model.score_thresh=0.0",
        "model.detections_per_img=5",
    )
    metrics = train(cfg)
    run_dir = Path(cfg.paths.output_dir)

    with (run_dir / "csv" / "metrics.csv").open() as handle:
        columns = set(next(csv.reader(handle)))
    expected = {"train/loss", "train/loss_cls", "train/loss_box", "val/map_best"}
    expected |= {
        f"{stage}/{name}"
        for stage in ("val", "test")
        for name in ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")
    }
    assert expected <= columns

    # wandb: boxes with class names on the validation images.
    run = read_offline_run(run_dir / "wandb", wait=60)
    assert run.complete and run.config["norm"]["name"] == "bn"
    rows = [row for row in run.history if "val/detections/all_boxes" in row]
    assert rows and rows[-1]["val/detections/_type"] == "images/separated"
    assert rows[-1]["val/detections/count"] == 3
    overlays = rows[-1]["val/detections/all_boxes"][0]
    assert {"predictions", "ground_truth"} <= set(overlays)
    run_files = next(path for path in run.media if path.suffix == ".png").parents[3]
    for group in ("predictions", "ground_truth"):
        content = json.loads((run_files / overlays[group]["path"]).read_text())
        assert content["class_labels"]["3"] == "3" and content["box_data"], group
        assert {"position", "class_id", "box_caption"} <= set(content["box_data"][0])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    accumulator.Reload()
    assert "val/detections" in accumulator.Tags()["images"]

    # normlab.eval rebuilds the detector from the checkpoint and reproduces the test mAP.
    best = next((run_dir / "checkpoints").glob("epoch*.ckpt"))
    eval_cfg = compose_config(f"ckpt_path={best}", "logger=csv", config_name="eval", run="eval")
    evaluated = evaluate(eval_cfg)
    assert evaluated["test/map"] == pytest.approx(metrics["test/map"], abs=1e-6)

    # ... and writes its detections in COCO's results format, which pycocotools reads against
    # the test json and scores as normlab did.
    (test_json,) = Path(cfg.data.root).rglob("instances_test.json")
    detections = Path(eval_cfg.paths.output_dir) / "detections_test.json"
    results = json.loads(detections.read_text())
    assert results and set(results[0]) == {"image_id", "category_id", "bbox", "score"}
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(test_json))
        evaluator = COCOeval(ground_truth, ground_truth.loadRes(str(detections)), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert {r["image_id"] for r in results} <= set(ground_truth.getImgIds())
    assert {r["category_id"] for r in results} <= set(ground_truth.getCatIds())
    assert evaluator.stats[0] == pytest.approx(evaluated["test/map"], abs=1e-4)


def test_warmup_multistep_schedule() -> None:
    from normlab.tasks.optim import warmup_multistep

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    scheduler = warmup_multistep(
        optimizer, total_steps=120, milestones=[2 / 3, 11 / 12], warmup_steps=10, warmup_factor=0.1
    )
    rates = []
    for _ in range(120):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.001)  # warmup_factor × lr
    assert rates[5] == pytest.approx(0.01 * (0.1 + 0.9 * 0.5))
    assert rates[10] == rates[79] == pytest.approx(0.01)
    assert rates[80] == pytest.approx(0.001) and rates[109] == pytest.approx(0.001)
    assert rates[110] == pytest.approx(0.0001)
    with pytest.raises(ValueError, match="fractions of the run"):
        warmup_multistep(optimizer, total_steps=10, milestones=[8])


def test_coco_experiment_is_the_reference_recipe(compose_config) -> None:
    cfg = compose_config("experiment=retinanet_coco", "data.root=/data/coco")
    assert cfg.model._target_ == "normlab.models.retinanet_resnet50_fpn"
    assert cfg.norm.name == "frozen_bn" and cfg.model.head_norm is None
    assert cfg.model.weights_backbone == "IMAGENET1K_V1"
    assert (cfg.model.min_size, cfg.model.max_size) == (800, 1333)
    assert list(cfg.data.train_min_sizes) == [800] and cfg.data.hflip == 0.5
    assert cfg.data.splits.train == "train2017" and cfg.data.splits.val == "val2017"
    assert cfg.task.optimizer._target_ == "torch.optim.SGD" and cfg.task.optimizer.lr == 0.01
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.max_epochs == 12
    # The model options the config sets all exist in the constructor.
    import inspect

    from normlab.models.retinanet import _retinanet_resnet_fpn

    accepted = set(inspect.signature(_retinanet_resnet_fpn).parameters)
    assert set(cfg.model) - {"_target_"} <= accepted
