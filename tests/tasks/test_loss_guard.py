"""The non-finite loss guard: what its stop message promises, and the skip policy's limit."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from normlab.tasks.guard import LossGuard, NonFiniteLossError

NAN = {"train/loss": torch.tensor(float("nan"))}
FINITE = {"train/loss": torch.tensor(1.0)}


def module_at(step: int, checkpoint_dir: Path | None = None) -> SimpleNamespace:
    """What the guard reads of a LightningModule: its trainer, buffers and log."""
    callback = SimpleNamespace(dirpath=str(checkpoint_dir)) if checkpoint_dir else None
    trainer = SimpleNamespace(
        world_size=1, global_step=step, current_epoch=0, checkpoint_callback=callback
    )
    return SimpleNamespace(trainer=trainer, buffers=lambda: [], log=lambda *a, **k: None)


def test_the_stop_message_says_whether_a_checkpoint_exists(tmp_path):
    guard = LossGuard("stop")
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    with pytest.raises(NonFiniteLossError) as stopped:
        guard.check(module_at(0, checkpoints), NAN, batch_idx=0)
    message = str(stopped.value)
    assert "no checkpoint had been written yet" in message
    assert "last good state" not in message

    (checkpoints / "last.ckpt").write_bytes(b"")
    with pytest.raises(NonFiniteLossError, match=f"the checkpoints in {checkpoints} hold states"):
        guard.check(module_at(4, checkpoints), NAN, batch_idx=4)


def test_skipping_most_batches_stops_the_run():
    guard = LossGuard("skip", max_fraction=0.25)
    module = module_at(0)
    guard.remember(module)
    for step in range(20):  # 17 of 20 skipped, as in the issue
        assert guard.check(module, NAN if step < 17 else FINITE, batch_idx=step) == (step >= 17)
    with pytest.raises(NonFiniteLossError) as stopped:
        guard.check_skipped_fraction()
    assert str(stopped.value).startswith(
        "task.on_nonfinite_loss=skip left out 17 of 20 training steps (85%), more than "
        "task.max_nonfinite_fraction=0.25"
    )


def test_rare_skips_within_the_fraction_let_the_run_go_on():
    guard = LossGuard("skip", max_fraction=0.25)
    module = module_at(0)
    for step in range(8):  # 1 of 8, as tests/reliability/test_faults.py's run with skip
        guard.check(module, NAN if step == 4 else FINITE, batch_idx=step)
    guard.check_skipped_fraction()
    LossGuard("stop").check_skipped_fraction()  # nothing skipped, nothing checked
