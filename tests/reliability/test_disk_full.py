"""A full disk: refused at start in one line naming the dir and its free space (before Hydra
writes there, and again for a checkpoint of the model); a save that does not fit stops the run in
one line and keeps the previous checkpoint; unfinished saves of killed runs are cleared at start.
(A full disk is simulated: shutil.disk_usage reports little room, or torch.save fails.)"""

from __future__ import annotations

import errno
import logging
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from cli import TINY_DIGITS_RUN as TINY
from cli import run_train_with
from normlab.callbacks.checkpointing import AtomicCheckpointIO, checkpoint_size_estimate
from normlab.errors import ConfigError, TrainingError
from normlab.train import train
from normlab.utils import writable_dirs
from normlab.utils.hydra_run import CONFIG_DIR
from normlab.utils.writable_dirs import WritableRunDir

MiB = 2**20
Usage = namedtuple("Usage", "total used free")


def report_free(monkeypatch, *free: int) -> None:
    """shutil.disk_usage answers ``free`` bytes free, call after call (the last one from then
    on): a disk that fills up while a checkpoint is written."""
    answers = list(free)

    def usage(path: str | Path) -> Usage:
        return Usage(100 * 2**30, 0, answers.pop(0) if len(answers) > 1 else answers[0])

    monkeypatch.setattr(shutil, "disk_usage", usage)


def test_a_full_disk_stops_the_command_before_hydra_writes_there(tmp_path, monkeypatch, capsys):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        config = compose(
            "config", overrides=[f"hydra.run.dir={tmp_path / 'run'}"], return_hydra_config=True
        )
    report_free(monkeypatch, 3 * MiB)  # the empty probe file is still written
    with pytest.raises(SystemExit) as stopped:
        WritableRunDir().on_run_start(config=config)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"normlab: configuration error: {tmp_path / 'run'} has 3.0 MiB free, a run's config and "
        "log files needs about 16.0 MiB; free space there or set hydra.run.dir to a directory on "
        "a disk with room"
    )


def test_a_disk_without_room_for_one_checkpoint_is_refused_before_training(
    compose_config, monkeypatch
):
    cfg = compose_config(*TINY)
    monkeypatch.setattr(writable_dirs, "MIN_FREE_BYTES", 0)  # room for the config files
    report_free(monkeypatch, MiB)
    with pytest.raises(ConfigError, match=r"checkpoints has 1\.0 MiB free, a checkpoint of this "):
        train(cfg)
    assert not list((Path(cfg.paths.output_dir) / "checkpoints").glob("*.ckpt"))


def test_the_checkpoint_estimate_counts_weights_and_optimizer_state():
    model = torch.nn.Linear(1000, 1000)  # 1001000 float32 parameters
    assert checkpoint_size_estimate(model) == 3 * 1001000 * 4


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A last.ckpt written before the disk filled up."""
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 4, "w": torch.ones(10)}, path)
    return path


NEXT = {"global_step": 5, "w": torch.zeros(MiB)}  # 4 MiB of tensors


def assert_kept(path: Path) -> None:
    assert torch.load(path, weights_only=True)["global_step"] == 4
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no partial file


def test_a_save_on_a_full_disk_stops_in_one_line_and_keeps_the_previous_checkpoint(
    saved, monkeypatch
):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    report_free(monkeypatch, 100 * MiB, MiB)  # room before the write, 1 MiB left after it
    with pytest.raises(TrainingError) as stopped:
        AtomicCheckpointIO().save_checkpoint(NEXT, saved)
    assert str(stopped.value) == (
        f"cannot write {saved}: {saved.parent} has 1.0 MiB free, the checkpoint needs about "
        "4.0 MiB; the previous last.ckpt (if any) is kept. Free space there and continue with "
        "ckpt_path=last or resume=auto"
    )
    assert_kept(saved)


def test_torchs_unexpected_pos_error_on_a_full_disk_is_named_as_such(saved, monkeypatch):
    def short_write(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 4")

    monkeypatch.setattr(torch, "save", short_write)
    report_free(monkeypatch, 100 * MiB, MiB)
    with pytest.raises(TrainingError, match=r"has 1\.0 MiB free, the checkpoint needs about 4\.0"):
        AtomicCheckpointIO().save_checkpoint(NEXT, saved)
    assert_kept(saved)
    # With room on the disk the same error is some other fault, and is not renamed.
    report_free(monkeypatch, 100 * MiB)
    with pytest.raises(RuntimeError, match="unexpected pos"):
        AtomicCheckpointIO().save_checkpoint(NEXT, saved)
    assert_kept(saved)


def test_a_save_larger_than_the_free_space_is_not_started(saved, monkeypatch):
    report_free(monkeypatch, MiB)
    monkeypatch.setattr(torch, "save", pytest.fail)
    with pytest.raises(TrainingError, match=rf"cannot write {saved}: .* has 1\.0 MiB free"):
        AtomicCheckpointIO().save_checkpoint(NEXT, saved)
    assert_kept(saved)


def test_unfinished_saves_of_a_killed_run_are_removed_at_start(compose_config, caplog):
    cfg = compose_config(*TINY)
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    checkpoints.mkdir(parents=True)
    stale = checkpoints / ".last.ckpt.4242.partial"
    stale.write_bytes(b"half a checkpoint")
    with caplog.at_level(logging.INFO):
        train(cfg)
    assert not stale.exists()
    assert (
        f"removed 1 unfinished checkpoint write(s) of an earlier run from {checkpoints}: "
        ".last.ckpt.4242.partial" in caplog.text
    )


DISK_FILLS_AT = """
import shutil
from collections import namedtuple
import lightning.pytorch as pl

class DiskFillsAt(pl.Callback):
    # From step `step` on, the disk reports 1 MiB free.

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step + 1 == self.step:
            usage = namedtuple("Usage", "total used free")
            shutil.disk_usage = lambda path: usage(2**30, 2**30 - 2**20, 2**20)
"""


def test_a_run_whose_disk_fills_up_stops_in_one_line_with_its_last_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    result = run_train_with(
        tmp_path,
        "disk_for_test",
        DISK_FILLS_AT,
        f"hydra.run.dir={run_dir}",
        *TINY,
        "callbacks.last_checkpoint.every_n_train_steps=1",
        "+callbacks.disk={_target_:disk_for_test.DiskFillsAt,step:3}",
        timeout=300,
    )
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = run_dir / "checkpoints" / "last.ckpt"
    reported = [line for line in result.stderr.splitlines() if line.startswith("normlab:")]
    assert len(reported) == 1
    assert reported[0].startswith(
        f"normlab: training stopped: cannot write {last}: {last.parent} has 1.0 MiB free, the "
        "checkpoint needs about "
    )
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
