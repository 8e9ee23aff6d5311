"""last.ckpt never gets ahead of metrics.csv: whenever it is on disk, the rows of every step
before the one its resume logs first are on disk too, so a kill at any moment loses no row."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from normlab.callbacks.checkpointing import AtomicCheckpointIO, LastCheckpoint
from normlab.utils.logs import METRICS_FILE, ResumableCSVLogger, first_logged_step


class LoggingModel(BoringModel):
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> Any:
        output = super().training_step(batch, batch_idx)
        self.log("train/loss", output["loss"])
        return output


class DiskProbe(pl.Callback):
    """Placed after LastCheckpoint: looks at the files at every hook where a kill could land."""

    def __init__(self, checkpoint: Path, metrics: Path) -> None:
        self.checkpoint = checkpoint
        self.metrics = metrics
        self.missing: list[str] = []
        self.looks = 0
        self.steps_seen: list[int] = []  # last.ckpt's step at each look

    def _look(self, hook: str) -> None:
        if not self.checkpoint.is_file():
            return
        self.looks += 1
        stored = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        first = first_logged_step(stored)
        self.steps_seen.append(stored["global_step"])
        steps = set()
        if self.metrics.is_file():
            with self.metrics.open(newline="") as handle:
                steps = {int(row["step"]) for row in csv.DictReader(handle) if row["train/loss"]}
        lost = set(range(first)) - steps
        if lost:
            self.missing.append(f"{hook}: last.ckpt resumes at step {first}, rows {lost} absent")
        # Lightning resumes a checkpoint of an epoch's last batch in the next epoch: one in
        # place when that epoch's validation starts would skip it.
        progress = stored["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        if hook == "on_validation_start" and progress["is_last_batch"]:
            self.missing.append(f"{hook}: last.ckpt resumes after this validation")

    def on_train_batch_end(self, *args: Any) -> None:
        self._look("on_train_batch_end")

    def on_train_batch_start(self, *args: Any) -> None:
        self._look("on_train_batch_start")

    def on_validation_start(self, *args: Any) -> None:
        self._look("on_validation_start")


@pytest.mark.parametrize(("flush_every", "validation"), [(1, 1), (100, 1), (1, 0)])
def test_last_checkpoint_is_published_only_after_the_rows_it_skips_are_on_disk(
    tmp_path, flush_every, validation
):
    logger = ResumableCSVLogger(
        tmp_path, name="csv", version="", flush_logs_every_n_steps=flush_every
    )
    probe = DiskProbe(tmp_path / "last.ckpt", Path(logger.log_dir) / METRICS_FILE)
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=4,
        limit_val_batches=validation,
        log_every_n_steps=1,
        logger=logger,
        callbacks=[LastCheckpoint(tmp_path, every_n_train_steps=1), probe],
        plugins=[AtomicCheckpointIO()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(LoggingModel())
    assert probe.looks >= 8 and not probe.missing, probe.missing
    # The first epoch's last step (4) is on disk before the second epoch trains, validated or not.
    assert 4 in probe.steps_seen
    # The run's last state is the one in place, with nothing left staged.
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 8
    assert [path.name for path in tmp_path.glob(".*")] == []
