"""Image classification as a LightningModule: any model from the registry-driven zoo, any norm."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn
from torchmetrics import MaxMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from normlab.ranges import FRACTION, checked_arguments
from normlab.tasks.base import Task, take_values
from normlab.tasks.checks import check_norm_inputs, check_num_classes
from normlab.tasks.optim import configure_optimization
from normlab.utils.figures import confusion_matrix_figure, figure_to_array, image_grid, log_image


def _top_k(num_classes: int) -> int:
    """The k of the top-k accuracy logged besides top-1."""
    return min(5, num_classes)


@checked_arguments(label_smoothing=FRACTION, max_nonfinite_fraction=FRACTION)
class ClassificationModule(Task):
    """Cross-entropy classification with top-1/top-5 accuracy and visual diagnostics.

    ``model``, ``optimizer`` and ``scheduler`` are Hydra configs (``_target_``; the latter two
    ``_partial_``), stored in the checkpoint's hyperparameters so that
    ``ClassificationModule.load_from_checkpoint(path)`` rebuilds everything on its own.
    """

    batch_format = "labelled images"
    network_names = ("model",)
    averaged_network_names = ("model",)

    def __init__(
        self,
        model: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        num_classes: int,
        scheduler: Mapping[str, Any] | None = None,
        scheduler_interval: str = "step",
        label_smoothing: float = 0.0,
        decay_norm_and_bias: bool = False,
        num_misclassified: int = 32,
        channels_last: bool = False,
        on_nonfinite_loss: str = "stop",
        max_nonfinite_fraction: float = 0.25,
        eval_norm_statistics: str = "population",
    ) -> None:
        super().__init__(on_nonfinite_loss, max_nonfinite_fraction, eval_norm_statistics)
        self.model: nn.Module = instantiate(self.hparams.model)
        self._memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

        top_k = _top_k(num_classes)
        metrics = MetricCollection(
            {
                # Micro average: the fraction of samples right, as papers report accuracy.
                "acc": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
                f"acc_top{top_k}": MulticlassAccuracy(num_classes, top_k=top_k, average="micro"),
            },
            # Top-1 and top-k share a state layout; grouping would merge them whenever the
            # first batch is all correct, making top-k silently equal top-1.
            compute_groups=False,
        )
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.val_acc_best = MaxMetric()
        self.val_confusion = MulticlassConfusionMatrix(num_classes)
        self._misclassified: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @classmethod
    def logged_metrics(cls, num_classes: int | None = None) -> list[str]:
        """Every metric name this task logs (what ``monitor.metric`` and ``optimized_metric`` may
        name). The top-k accuracy is ``acc_top{min(5, num_classes)}``: with the class count not
        known yet (it comes from the data) every k it could be is listed."""
        ks = range(1, 6) if num_classes is None else [_top_k(num_classes)]
        per_stage = ["loss", "acc", *(f"acc_top{k}" for k in ks)]
        names = [f"{stage}/{name}" for stage in ("train", "val", "test") for name in per_stage]
        return [*names, "val/acc_best"]

    def check_run(self, trainer: pl.Trainer, datamodule: pl.LightningDataModule | None) -> None:
        """Refuse a model that cannot take the data, before any is read: fewer outputs than the
        data has classes, or a norm that cannot train on the maps these images give."""
        check_num_classes(self.hparams.num_classes, datamodule)
        image_size = getattr(datamodule, "image_size", None)
        in_channels = getattr(datamodule, "in_channels", None)
        batch_size = getattr(datamodule, "batch_size", None)
        if image_size and in_channels:
            self.set_example_input(torch.zeros(1, in_channels, image_size, image_size), trainer)
        if image_size and in_channels and batch_size:
            check_norm_inputs(
                self.model,
                (batch_size, in_channels, image_size, image_size),
                where=f"data.image_size={image_size}, data.batch_size={batch_size}",
                datamodule=datamodule,
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.contiguous(memory_format=self._memory_format))

    def forward_for_norm_statistics(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Run the classifier on a training batch, for callbacks that measure or recompute its
        norm statistics (``PreciseBN``); they set the modes and disable gradients."""
        self(batch[0])

    def inference_network(
        self, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        """The network to export (``normlab.export``) and its input for ``batch``: the classifier
        on the batch's images (in the memory format the task trains with)."""
        return self.model, (batch[0].contiguous(memory_format=self._memory_format),)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor | None:
        self.loss_guard.remember(self)
        images, targets = batch
        logits = self(images)
        loss = self._loss(logits, targets)
        if not self.loss_guard.check(self, {"train/loss": loss}, batch_idx):
            return None  # Lightning skips the backward pass and the optimizer step
        self.train_metrics.update(logits, targets)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(targets))
        return loss

    def on_train_epoch_end(self) -> None:
        # From the metric states rather than logged in training_step: an epoch whose batches all
        # ran before a resume (ExactResume restores the states) still logs its value, and the
        # states are reset for the next epoch.
        if any(metric.update_called for metric in self.train_metrics.values()):
            self.log_dict(self.train_metrics.compute())
        self.train_metrics.reset()

    def on_validation_epoch_start(self) -> None:
        self._misclassified.clear()

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        """Update the ``stage`` metrics of every evaluated model (this one and, with weight
        averaging, its averaged copy) and log their losses; return this model's logits."""
        images, targets = batch
        outputs = {}
        for suffix, task in self.evaluated_models():
            logits = task(images)
            getattr(task, f"{stage}_metrics").update(logits, targets)
            self.log(
                f"{stage}/loss{suffix}",
                self._loss(logits, targets),
                prog_bar=stage == "val" and not suffix,
                batch_size=len(targets),
                sync_dist=True,
            )
            outputs[suffix] = logits
        return outputs[""]

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        logits = self._evaluate(batch, "val")
        images, targets = batch
        self.val_confusion.update(logits, targets)
        self._keep_misclassified(images, logits.argmax(dim=1), targets)

    def _keep_misclassified(
        self, images: torch.Tensor, predictions: torch.Tensor, targets: torch.Tensor
    ) -> None:
        room = self.hparams.num_misclassified - sum(len(t) for _, _, t in self._misclassified)
        wrong = (predictions != targets).nonzero().flatten()[: max(room, 0)]
        if len(wrong):
            self._misclassified.append(
                (images[wrong].cpu(), predictions[wrong].cpu(), targets[wrong].cpu())
            )

    def on_validation_epoch_end(self) -> None:
        self.log_evaluation(
            lambda task: take_values(task.val_metrics),
            best_of="val/acc",
            prog_bar=("val/acc", "val/acc_best", f"val/acc_top{_top_k(self.hparams.num_classes)}"),
        )
        matrix = self.val_confusion.compute()
        self.val_confusion.reset()
        if self.trainer.sanity_checking or not self.trainer.loggers:
            return
        names = getattr(self.trainer.datamodule, "class_names", None) or [
            str(i) for i in range(self.hparams.num_classes)
        ]
        step = self.global_step
        figure = confusion_matrix_figure(matrix, names)
        log_image(self.trainer.loggers, "val/confusion_matrix", figure_to_array(figure), step)
        if self._misclassified:
            images, predictions, targets = (
                torch.cat(parts) for parts in zip(*self._misclassified, strict=True)
            )
            caption = "  ".join(
                f"{names[t]}→{names[p]}" for p, t in zip(predictions, targets, strict=True)
            )
            log_image(
                self.trainer.loggers,
                "val/misclassified",
                image_grid(images),
                step,
                caption=f"true→predicted, row by row: {caption}",
            )

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self.log_evaluation(lambda task: take_values(task.test_metrics))

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_optimization(self, self.model, self.hparams.decay_norm_and_bias)
