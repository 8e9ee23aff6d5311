"""Loggers that continue a resumed run's files instead of starting them over."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, open_dict

METRICS_FILE = "metrics.csv"


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger, which empties ``metrics.csv`` when it starts, except that a resumed
    run keeps the rows logged before its checkpoint and appends after them."""

    def __init__(self, *args: Any, keep_before_step: int | None = None, **kwargs: Any) -> None:
        """``keep_before_step``: keep the rows of an existing ``metrics.csv`` logged at steps
        below it (the rest, logged after the checkpoint a run resumes from, is logged again)."""
        super().__init__(*args, **kwargs)
        self._kept_rows: list[dict[str, str]] = []
        path = Path(self.log_dir) / METRICS_FILE
        if keep_before_step is not None and path.is_file():
            with path.open(newline="") as handle:
                self._kept_rows = [
                    row
                    for row in csv.DictReader(handle)
                    # A row cut short by a kill lacks its last fields (None): dropped.
                    if None not in row.values() and int(row["step"]) < keep_before_step
                ]

    @property
    def experiment(self) -> Any:
        if self._experiment is not None or not self._kept_rows:
            return super().experiment
        with warnings.catch_warnings():
            # "Previous log files ... will be deleted": the rows to keep are already read.
            warnings.filterwarnings("ignore", message="Experiment logs directory")
            writer = super().experiment
        if hasattr(writer, "metrics"):  # rank 0's writer; other ranks get a no-op stand-in
            writer.metrics[:0] = self._kept_rows
        self._kept_rows = []
        return writer


def first_logged_step(checkpoint: dict[str, Any]) -> int:
    """The logging step (Lightning counts batches that stepped) at which a run resumed from
    ``checkpoint`` logs its first value: one more than stored when the checkpoint was written at
    the end of a training batch, before that batch's values were logged, or during a validation
    (which the resumed run does again, logging its values at the end, after the training
    batch's)."""
    loop = checkpoint["loops"]["fit_loop"]
    progress = loop["epoch_loop.batch_progress"]["current"]
    validation = loop.get("epoch_loop.val_loop.batch_progress", {}).get("total", {})
    stepped = loop["epoch_loop.state_dict"]["_batches_that_stepped"]
    in_validation = validation.get("started", 0) > validation.get("processed", 0)
    return stepped + int(progress["processed"] > progress["completed"] or in_validation)


def continue_logs(logger_cfg: DictConfig | None, checkpoint: Path) -> None:
    """Make the CSV and TensorBoard loggers of ``logger_cfg`` continue the files of the run that
    wrote ``checkpoint`` (wandb continues by its run id): the CSV keeps the rows logged before
    the checkpoint, TensorBoard hides the points logged after it (``purge_step``); the resumed
    run logs those again."""
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    step = first_logged_step(stored)
    for node in (logger_cfg or {}).values():
        target = str((node or {}).get("_target_", ""))
        with open_dict(node):
            if target.endswith("ResumableCSVLogger"):
                node.keep_before_step = step
            elif target.endswith("TensorBoardLogger"):
                node.purge_step = step
