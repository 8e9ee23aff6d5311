"""Object detection as a LightningModule: a torchvision-style detector (RetinaNet), any norm.

Batches are ``(images, targets)`` lists as the COCO data modules return them: images are 3×H×W
floats in [0, 1] of any size (the detector normalises and batches them itself), targets hold
``boxes`` (xyxy pixels) and ``labels``, plus ``iscrowd`` and ``area`` for COCO evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from hydra.utils import instantiate
from torch import Tensor, nn
from torchmetrics import MaxMetric
from torchmetrics.detection import MeanAveragePrecision

from normlab.models.retinanet import DenseRetinaNet
from normlab.ranges import FRACTION, check_choice, checked_arguments
from normlab.tasks.base import Task, take_values
from normlab.tasks.checks import check_norm_inputs, check_num_classes
from normlab.tasks.optim import configure_optimization
from normlab.utils.figures import log_detections

Batch = tuple[Sequence[Tensor], Sequence[dict[str, Tensor]]]

# torchmetrics' result keys → our metric names (COCO's AP@[.5:.95], AP50, AP75, by object size).
MAP_KEYS = {
    "map": "map",
    "map_50": "map_50",
    "map_75": "map_75",
    "map_small": "map_small",
    "map_medium": "map_medium",
    "map_large": "map_large",
    "mar_100": "mar_100",
}
MAP_BACKENDS = ("faster_coco_eval", "pycocotools")
# What the model's training forward returns → the names we log.
LOSS_NAMES = {"classification": "loss_cls", "bbox_regression": "loss_box"}


# COCOeval's own thresholds, in float64. torchmetrics' defaults come from a float32 linspace
# (0.550000011920929 instead of 0.55), which flips matches whose IoU sits on a threshold.
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10).tolist()
COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101).tolist()


def build_map_metric(backend: str = "faster_coco_eval") -> MeanAveragePrecision:
    """COCO box mAP exactly as COCOeval computes it (areas from the targets' ``area`` if given)."""
    check_choice("map_backend", backend, MAP_BACKENDS)
    return MeanAveragePrecision(
        box_format="xyxy",
        iou_type="bbox",
        iou_thresholds=COCO_IOU_THRESHOLDS,
        rec_thresholds=COCO_RECALL_THRESHOLDS,
        backend=backend,
    )


def coco_results(
    image_ids: Sequence[int],
    detections: Sequence[Mapping[str, Tensor]],
    category_ids: Sequence[int],
) -> list[dict[str, Any]]:
    """Detections in COCO's results format (what ``COCO.loadRes`` and evaluation servers read):
    one ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` per box, with the json's
    image and category ids. ``detections[i]`` holds xyxy ``boxes``, ``scores`` and contiguous
    ``labels`` for image ``image_ids[i]``."""
    results = []
    for image_id, detection in zip(image_ids, detections, strict=True):
        boxes = detection["boxes"].tolist()
        scores = detection["scores"].tolist()
        labels = detection["labels"].tolist()
        for (x1, y1, x2, y2), score, label in zip(boxes, scores, labels, strict=True):
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(category_ids[label]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": score,
                }
            )
    return results


def _eval_targets(targets: Sequence[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    keys = ("boxes", "labels", "iscrowd", "area")
    return [{k: t[k] for k in keys if k in t} for t in targets]


@checked_arguments(max_nonfinite_fraction=FRACTION)
class DetectionModule(Task):
    """Train a detector on its own loss dict; evaluate COCO mAP; show boxes in wandb.

    ``model``, ``optimizer`` and ``scheduler`` are Hydra configs stored in the checkpoint's
    hyperparameters, so ``DetectionModule.load_from_checkpoint(path)`` rebuilds everything.
    ``num_logged_images`` validation images are logged each epoch with predicted boxes scoring
    at least ``display_score_thresh`` and the ground truth.
    """

    batch_format = "images with boxes"
    network_names = ("model",)
    averaged_network_names = ("model",)

    def __init__(
        self,
        model: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        num_classes: int,
        scheduler: Mapping[str, Any] | None = None,
        scheduler_interval: str = "step",
        decay_norm_and_bias: bool = False,
        map_backend: str = "faster_coco_eval",
        num_logged_images: int = 8,
        display_score_thresh: float = 0.3,
        on_nonfinite_loss: str = "stop",
        max_nonfinite_fraction: float = 0.25,
        eval_norm_statistics: str = "population",
    ) -> None:
        super().__init__(on_nonfinite_loss, max_nonfinite_fraction, eval_norm_statistics)
        self.model: nn.Module = instantiate(self.hparams.model)
        self.val_map = build_map_metric(map_backend)
        self.test_map = build_map_metric(map_backend)
        self.val_map_best = MaxMetric()
        self._shown: list[tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]] = []
        # The last test run's detections per image, for coco_detections().
        self._tested: list[tuple[int, dict[str, Tensor]]] = []

    @classmethod
    def logged_metrics(cls) -> list[str]:
        """Every metric name this task logs (what ``monitor.metric`` and ``optimized_metric`` may
        name)."""
        losses = [f"train/{name}" for name in (*LOSS_NAMES.values(), "loss")]
        maps = [f"{stage}/{name}" for stage in ("val", "test") for name in MAP_KEYS.values()]
        return [*losses, *maps, "val/map_best"]

    def check_run(self, trainer: pl.Trainer, datamodule: pl.LightningDataModule | None) -> None:
        """Refuse, before any image is read, a detector with fewer classes than the data's
        categories, or a norm that cannot train on the smallest FPN maps of these images."""
        check_num_classes(self.hparams.num_classes, datamodule, what="categories")
        side, batch_size = self._probe_side(datamodule), getattr(datamodule, "batch_size", None)
        if side:
            # forward takes one list of images.
            self.set_example_input(([torch.zeros(3, side, side)],), trainer)
        if side and batch_size:
            check_norm_inputs(
                DenseRetinaNet(self.model),
                (batch_size, 3, side, side),
                where=f"{side}-px images (model.min_size, data sizes), "
                f"data.batch_size={batch_size}",
                datamodule=datamodule,
            )

    def _probe_side(self, datamodule: pl.LightningDataModule | None) -> int | None:
        """The smallest side of the training images as the detector batches them (padded to its
        size_divisible): the data's ``train_min_sizes`` where the detector leaves sizing to the
        data, else its own ``min_size`` (its evaluation size too)."""
        transform = getattr(self.model, "transform", None)
        if transform is None:
            return None
        data_sizes = getattr(datamodule, "train_min_sizes", None)
        skip_resize = getattr(transform, "_skip_resize", False)
        side = min(data_sizes) if skip_resize and data_sizes else min(transform.min_size)
        divisor = getattr(transform, "size_divisible", 1)
        return -(-side // divisor) * divisor

    def forward(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        return self.model(list(images))

    def forward_for_norm_statistics(self, batch: Batch) -> None:
        """Run the detector on a training batch's images, for callbacks that measure or recompute
        its norm statistics (``PreciseBN``). The detector itself runs as at inference (its eval
        resize, no targets, no losses); the callback puts only the norm layers in training mode."""
        self(batch[0])

    def inference_network(self, batch: Batch) -> tuple[nn.Module, tuple[Tensor, ...]]:
        """The network to export (``normlab.export``) and its input for ``batch``'s images: the
        detector without resize and post-processing (:class:`DenseRetinaNet`), on the images as
        the detector's own transform batches and normalises them (its eval resize in eval mode)."""
        images, _ = self.model.transform(list(batch[0]))
        return DenseRetinaNet(self.model), (images.tensors,)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        self.loss_guard.remember(self)
        images, targets = batch
        losses = self.model(list(images), [{k: t[k] for k in ("boxes", "labels")} for t in targets])
        loss = sum(losses.values())
        terms = {f"train/{LOSS_NAMES.get(key, key)}": value for key, value in losses.items()}
        if not self.loss_guard.check(self, terms, batch_idx):
            return None  # Lightning skips the backward pass and the optimizer step
        size = len(images)
        for key, value in losses.items():
            self.log(f"train/{LOSS_NAMES.get(key, key)}", value, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._shown.clear()

    def _evaluate(self, batch: Batch, stage: str) -> list[dict[str, Tensor]]:
        """Update the ``stage`` mAP of every evaluated model (this one and, with weight
        averaging, its averaged copy); return this model's detections."""
        images, targets = batch
        outputs = {}
        for suffix, task in self.evaluated_models():
            outputs[suffix] = task(images)
            getattr(task, f"{stage}_map").update(outputs[suffix], _eval_targets(targets))
        return outputs[""]

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        images, targets = batch
        self._keep_for_display(images, self._evaluate(batch, "val"), targets)

    def _keep_for_display(
        self,
        images: Sequence[Tensor],
        predictions: Sequence[dict[str, Tensor]],
        targets: Sequence[dict[str, Tensor]],
    ) -> None:
        threshold = self.hparams.display_score_thresh
        for image, prediction, target in zip(images, predictions, targets, strict=True):
            if len(self._shown) >= self.hparams.num_logged_images:
                return
            keep = prediction["scores"] >= threshold
            shown = {k: prediction[k][keep].cpu() for k in ("boxes", "labels", "scores")}
            truth = {k: target[k].cpu() for k in ("boxes", "labels")}
            self._shown.append((image.cpu(), shown, truth))

    @staticmethod
    def _map_values(metric: MeanAveragePrecision, stage: str) -> dict[str, Tensor]:
        results = take_values(metric)
        return {f"{stage}/{name}": results[key] for key, name in MAP_KEYS.items()}

    def on_validation_epoch_end(self) -> None:
        self.log_evaluation(
            lambda task: self._map_values(task.val_map, "val"),
            best_of="val/map",
            prog_bar=("val/map_50", "val/map_best"),
        )
        if self.trainer.sanity_checking or not self.trainer.loggers or not self._shown:
            return
        names = getattr(self.trainer.datamodule, "class_names", None) or [
            str(i) for i in range(self.hparams.num_classes)
        ]
        images, predictions, targets = zip(*self._shown, strict=True)
        log_detections(
            self.trainer.loggers,
            "val/detections",
            images,
            predictions,
            targets,
            names,
            self.global_step,
        )

    def on_test_epoch_start(self) -> None:
        self._tested.clear()

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        targets = batch[1]
        predictions = self._evaluate(batch, "test")
        for prediction, target in zip(predictions, targets, strict=True):
            if "image_id" in target:
                kept = {k: prediction[k].detach().cpu() for k in ("boxes", "scores", "labels")}
                self._tested.append((int(target["image_id"]), kept))

    def coco_detections(self, category_ids: Sequence[int]) -> list[dict[str, Any]]:
        """The detections of the last test run in COCO's results format (the json's image ids,
        ``category_ids[label]``, xywh boxes, scores): see :func:`coco_results`."""
        image_ids = [image_id for image_id, _ in self._tested]
        return coco_results(image_ids, [d for _, d in self._tested], category_ids)

    def on_test_epoch_end(self) -> None:
        self.log_evaluation(lambda task: self._map_values(task.test_map, "test"))

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_optimization(self, self.model, self.hparams.decay_norm_and_bias)
