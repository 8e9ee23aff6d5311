"""``task.eval_norm_statistics=batch``: validation normalises each batch with its own statistics,
metric for metric what a hand-written train-mode evaluation gives, and leaves every buffer of the
module as it was."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from torch import nn

from normlab.errors import ConfigError
from normlab.runs import instantiate_data
from normlab.tasks import ClassificationModule, Pix2PixModule
from normlab.train import train
from tiny_runs import compose_run, tiny_checkpoint

EVAL_BATCH = 8
BATCHES = 3


@pytest.fixture(scope="module")
def batch_checkpoint(tmp_path_factory) -> Path:
    """A DenseNet-BC-40 (BN) trained two steps, validated with batch statistics."""
    return tiny_checkpoint(
        "classification",
        tmp_path_factory.mktemp("batch") / "run",
        "task.eval_norm_statistics=batch",
        f"data.eval_batch_size={EVAL_BATCH}",
    )


def _validate(module: ClassificationModule, datamodule) -> dict[str, float]:
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=BATCHES,
    )
    (metrics,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    return metrics


def _train_mode_metrics(module: ClassificationModule, datamodule) -> dict[str, float]:
    """Loss and accuracy of a copy of the classifier in train() (dropout in eval mode), a fresh
    copy for each batch so that no batch sees statistics another one left."""
    losses, correct, seen = [], 0, 0
    for index, (images, targets) in enumerate(datamodule.val_dataloader()):
        if index == BATCHES:
            break
        network = copy.deepcopy(module.model).train()
        for layer in network.modules():
            if isinstance(layer, nn.Dropout):
                layer.eval()
        with torch.no_grad():
            logits = network(images)
        losses.append(F.cross_entropy(logits, targets) * len(targets))
        correct += int((logits.argmax(1) == targets).sum())
        seen += len(targets)
    return {"val/loss": float(sum(losses) / seen), "val/acc": correct / seen}


def test_validation_with_batch_statistics_is_a_train_mode_evaluation(batch_checkpoint, caplog):
    module = ClassificationModule.load_from_checkpoint(batch_checkpoint, map_location="cpu")
    assert module.eval_norm_statistics == "batch"
    trained = OmegaConf.load(batch_checkpoint.parent.parent / "config_resolved.yaml")
    datamodule = instantiate_data(trained.data)
    before = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    modes = [layer.training for layer in module.modules()]

    with caplog.at_level(logging.INFO, logger="normlab.tasks.base"):
        batch = _validate(module, datamodule)
    expected = _train_mode_metrics(module, datamodule)
    assert batch["val/acc"] == pytest.approx(expected["val/acc"], abs=1e-6)
    assert batch["val/loss"] == pytest.approx(expected["val/loss"], rel=1e-5)
    after = module.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    (line,) = [r.message for r in caplog.records if r.message.startswith("norm statistics: batch")]
    assert "39 norm layers (BatchNorm2d ×39)" in line and f"({EVAL_BATCH} images" in line

    assert [layer.training for layer in module.modules()] == modes

    module.eval_norm_statistics = "population"
    population = _validate(module, datamodule)
    assert population["val/loss"] != pytest.approx(batch["val/loss"], rel=1e-3)


def test_a_bad_eval_norm_statistics_names_the_key(tmp_path):
    cfg = compose_run(["task.eval_norm_statistics=running"], "config", tmp_path / "run")
    try:
        with pytest.raises(ConfigError) as error:
            train(cfg)
    finally:
        GlobalHydra.instance().clear()
    assert str(error.value) == (
        "task.eval_norm_statistics='running' is not one of population, batch"
    )


def test_pix2pix_validates_its_generator_with_batch_statistics(tmp_path, caplog):
    checkpoint = tiny_checkpoint(
        "pix2pix",
        tmp_path / "run",
        "task.eval_norm_statistics=batch",
        "trainer.limit_val_batches=2",
    )
    module = Pix2PixModule.load_from_checkpoint(checkpoint, map_location="cpu")
    trained = OmegaConf.load(checkpoint.parent.parent / "config_resolved.yaml")
    datamodule = instantiate_data(trained.data)
    before = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="normlab.tasks.base"):
        first, second = _validate(module, datamodule), _validate(module, datamodule)
    assert first == second  # no dropout, nothing left behind by the first
    assert all(torch.equal(before[name], tensor) for name, tensor in module.state_dict().items())
    assert any("(BatchNorm2d ×" in r.message for r in caplog.records)
    module.eval_norm_statistics = "population"
    assert _validate(module, datamodule)["val/l1"] != pytest.approx(first["val/l1"], rel=1e-4)
