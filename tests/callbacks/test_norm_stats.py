"""NormStatistics: per-type gap curves to every logger (exact values in a tiny fit), per-layer
histograms to wandb, and the callback config composing with the default callbacks."""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from normlab.callbacks import NormStatistics
from normlab.collect.wandb_runs import read_offline_run
from normlab.errors import ConfigError
from normlab.train import train


class TinyTask(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 2),
        )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_gap_curves_are_the_first_batchs_gaps(tmp_path):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(12, 3, 6, 6, generator=generator, dtype=torch.float64) * 2 + 1
    data = TensorDataset(images, torch.randint(0, 2, (12,), generator=generator))
    pl.seed_everything(0)
    task = TinyTask().double()
    initial = copy.deepcopy(task.net)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        precision="64-true",
        callbacks=[NormStatistics(every_n_epochs=2)],
        logger=CSVLogger(tmp_path, name="csv", version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, DataLoader(data, batch_size=4))

    with (tmp_path / "csv" / "metrics.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("norm_stats/BatchNorm2d/mean_gap")]
    # every_n_epochs=2: epoch 0 only, after its first step; running statistics then (0, 1).
    assert [int(r["step"]) for r in rows] == [1]
    with torch.no_grad():
        x = initial[0](images[:4])
    mean = x.transpose(0, 1).flatten(1).mean(1)
    var = x.transpose(0, 1).flatten(1).var(1, correction=1)
    eps = 1e-5
    expected_mean_gap = (mean / math.sqrt(1 + eps)).pow(2).mean().sqrt()
    expected_var_gap = torch.log((var + eps) / (1 + eps)).pow(2).mean().sqrt()
    assert float(rows[0]["norm_stats/BatchNorm2d/mean_gap"]) == pytest.approx(
        float(expected_mean_gap), rel=1e-9
    )
    assert float(rows[0]["norm_stats/BatchNorm2d/var_gap"]) == pytest.approx(
        float(expected_var_gap), rel=1e-9
    )


def test_bad_option_names_the_key():
    with pytest.raises(ConfigError, match=r"callbacks\.norm_stats\.every_n_epochs must be"):
        NormStatistics(every_n_epochs=0)


def test_run_logs_curves_to_csv_and_histograms_to_wandb(compose_config):
    cfg = compose_config(
        "callbacks=[precise_bn,norm_stats]",
        "callbacks.model_summary=null",
        "callbacks.progress_bar=null",
        "callbacks.precise_bn.num_batches=2",
        "logger=default",
        "data.batch_size=8",
        "data.image_size=16",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.log_every_n_steps=1",
    )
    assert {"model_checkpoint", "precise_bn", "norm_stats"} <= set(cfg.callbacks)
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)

    with (run_dir / "csv" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    curves = ("norm_stats/BatchNorm2d/mean_gap", "norm_stats/BatchNorm2d/var_gap")
    for key in curves:
        values = [float(r[key]) for r in rows if r.get(key)]
        assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values), key
    assert [
        float(r["precise_bn/num_batches"]) for r in rows if r.get("precise_bn/num_batches")
    ] == [
        2.0,
        2.0,
    ]

    run = read_offline_run(run_dir / "wandb", wait=60)
    assert run.complete
    layer = "norm_stats/model.features.denseblock1.denselayer1.norm1"
    rows = [row for row in run.history if f"{layer}/running_var/_type" in row]
    assert len(rows) == 2  # one per epoch
    for name in ("running_mean", "running_var", "mean_gap", "var_gap"):
        assert rows[-1][f"{layer}/{name}/_type"] == "histogram"
        assert sum(rows[-1][f"{layer}/{name}/values"]) == 24  # the layer's channels
    assert set(curves) <= run.history_keys
