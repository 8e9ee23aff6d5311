"""Progress wherever the output goes: log lines (stdout and train.log) when stdout is a file or
a pipe, Rich's bar in a terminal, and neither shows the logger's version number."""

from __future__ import annotations

import re

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger

from cli import offline_env, run_train
from normlab.callbacks.progress import (
    LoggedProgress,
    ReadableRichProgressBar,
    duration,
    terminal_or_logged_progress,
    time_left,
)

PROGRESS = re.compile(
    r"normlab\.progress\]\[INFO\] - epoch (\d)/2( done)? \| step (\d+)/8 \| train/loss [\d.]+ .*"
    r"\| [\d.]+ steps/s \| about \S+ left$"
)


def test_a_run_writing_to_a_file_logs_a_progress_line_per_epoch_and_at_its_interval(tmp_path):
    run_dir = tmp_path / "run"
    # A pipe, as a Slurm .out file or nohup gives: not a terminal.
    result = run_train(
        "model=densenet_bc_40",
        "data.image_size=16",
        "data.batch_size=8",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=1",
        "test=false",
        "logger=csv",
        "callbacks.model_summary=null",
        "callbacks.progress_bar.every_n_steps=3",
        f"hydra.run.dir={run_dir}",
        env=offline_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [m.groups() for m in map(PROGRESS.search, result.stdout.splitlines()) if m]
    # Every 3 steps (step 3 and step 6, not at an epoch's last batch) and at each epoch's end.
    assert lines == [("1", None, "3"), ("1", " done", "4"), ("2", None, "7"), ("2", " done", "8")]
    logged = [
        m.groups()
        for m in map(PROGRESS.search, (run_dir / "train.log").read_text().splitlines())
        if m
    ]
    assert logged == lines
    assert "v_num" not in result.stdout


def test_a_terminal_gets_the_rich_bar_and_anything_else_the_log_lines(monkeypatch):
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert isinstance(terminal_or_logged_progress(), ReadableRichProgressBar)
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    progress = terminal_or_logged_progress(every_n_steps=5, every_n_seconds=None)
    assert isinstance(progress, LoggedProgress)
    assert (progress.every_n_steps, progress.every_n_seconds) == (5, None)


def test_the_rich_bar_leaves_out_the_loggers_version_number(tmp_path):
    readable, plain = ReadableRichProgressBar(), RichProgressBar()
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=1,
        logger=CSVLogger(tmp_path, version=7),
        callbacks=[readable],
        enable_model_summary=False,
        limit_val_batches=0,
    )
    model = BoringModel()
    trainer.fit(model)
    assert plain.get_metrics(trainer, model)["v_num"] == 7  # what Lightning would show
    assert "v_num" not in readable.get_metrics(trainer, model)


def test_durations_read_as_a_person_says_them():
    assert [duration(s) for s in (4.4, 75, 3 * 3600 + 5 * 60 + 9)] == ["4s", "1m15s", "3h05m"]


def test_time_left_is_the_pace_so_far_applied_to_what_remains():
    assert time_left(3, 10, 30.0) == "about 1m10s left"
    assert time_left(10, 10, 30.0) == "about 0s left"
    assert time_left(0, 10, 5.0) == ""
