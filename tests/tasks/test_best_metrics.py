"""Best-of metrics (val/acc_best, val/map_best, val/l1_best) see real validations only.

Lightning's sanity check runs a few validation batches before training; what they score must not
count. Each test makes the sanity check's predictions perfect (a thousand right answers added to
the validation metric just before the task reads it) so that a best-of that kept them would
differ from the one real validation of a one-epoch run.
"""

from __future__ import annotations

import pytest
import torch

from normlab.tasks.classification import ClassificationModule
from normlab.tasks.detection import DetectionModule
from normlab.tasks.pix2pix import Pix2PixModule
from normlab.train import train

PERFECT = 1000  # right answers added during the sanity check: any best that kept them is ~perfect
ONE_EPOCH = ("trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1")
QUIET = ("logger=csv", "test=false", "callbacks.model_summary=null", "callbacks.progress_bar=null")


def perfect_sanity_check(monkeypatch, task_class: type, add_perfect_predictions) -> None:
    """Before ``task_class`` reads its validation metrics at the end of the sanity check, add
    perfect predictions to them."""
    original = task_class.on_validation_epoch_end

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            add_perfect_predictions(self)
        original(self)

    monkeypatch.setattr(task_class, "on_validation_epoch_end", on_validation_epoch_end)


def test_classification_best_accuracy_ignores_the_sanity_check(compose_config, monkeypatch):
    def add(task: ClassificationModule) -> None:
        targets = torch.arange(PERFECT) % task.hparams.num_classes
        logits = torch.nn.functional.one_hot(targets, task.hparams.num_classes).float()
        task.val_metrics.update(logits, targets)

    perfect_sanity_check(monkeypatch, ClassificationModule, add)
    cfg = compose_config(
        "model=densenet_bc_40", "data.image_size=16", "data.batch_size=8", *ONE_EPOCH, *QUIET
    )
    metrics = train(cfg)
    assert metrics["val/acc"] < 0.9  # one step from random weights
    assert metrics["val/acc_best"] == pytest.approx(metrics["val/acc"])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def test_detection_best_map_ignores_the_sanity_check(compose_config, monkeypatch, data_root):
    def add(task: DetectionModule) -> None:
        boxes = torch.tensor([[10.0, 10.0, 40.0, 40.0]])
        labels = torch.tensor([1])
        truth = [{"boxes": boxes, "labels": labels}] * PERFECT
        predictions = [{"boxes": boxes, "labels": labels, "scores": torch.ones(1)}] * PERFECT
        task.val_map.update(predictions, truth)

    perfect_sanity_check(monkeypatch, DetectionModule, add)
    cfg = compose_config(
        "experiment=retinanet_digits",
        f"data.root={data_root / 'scenes'}",
        "data.num_train=4",
        "data.num_val=4",
        "data.num_test=4",
        "data.batch_size=4",
        *ONE_EPOCH,
        *QUIET,
    )
    metrics = train(cfg)
    assert metrics["val/map"] < 0.5
    assert metrics["val/map_best"] == pytest.approx(metrics["val/map"])


def test_pix2pix_best_l1_ignores_the_sanity_check(compose_config, monkeypatch, data_root):
    def add(task: Pix2PixModule) -> None:
        task.val_metrics["l1"].update(torch.zeros(PERFECT))

    perfect_sanity_check(monkeypatch, Pix2PixModule, add)
    cfg = compose_config(
        "experiment=pix2pix_digits",
        f"data.root={data_root / 'pairs'}",
        "data.num_train=4",
        "data.num_val=4",
        "data.num_test=4",
        "data.batch_size=4",
        "model.generator.ngf=8",
        "model.discriminator.ndf=8",
        *ONE_EPOCH,
        *QUIET,
    )
    metrics = train(cfg)
    assert metrics["val/l1"] > 0.05
    assert metrics["val/l1_best"] == pytest.approx(metrics["val/l1"])
