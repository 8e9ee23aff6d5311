"""ExactResume warns that a resume is not exact only when the checkpoint lacks RNG states, not
whenever a run resumes at an epoch boundary."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from normlab.callbacks.resume import ExactResume

NOT_EXACT = "without RNG states"


def fit(tmp_path, epochs: int, ckpt_path=None) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=epochs,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=False,
        callbacks=[ExactResume()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(BoringModel(), ckpt_path=ckpt_path)
    return trainer


def test_resuming_at_an_epoch_boundary_is_exact_and_says_nothing(tmp_path, caplog):
    fit(tmp_path, 1).save_checkpoint(tmp_path / "epoch1.ckpt")
    with caplog.at_level(logging.WARNING, logger="normlab.callbacks.resume"):
        fit(tmp_path, 2, tmp_path / "epoch1.ckpt")
    assert NOT_EXACT not in caplog.text


def test_a_checkpoint_without_rng_states_is_said_to_resume_inexactly(tmp_path, caplog):
    fit(tmp_path, 1).save_checkpoint(tmp_path / "epoch1.ckpt")
    checkpoint = torch.load(tmp_path / "epoch1.ckpt", weights_only=False)
    del checkpoint["rng_states"]
    torch.save(checkpoint, tmp_path / "no_rng.ckpt")
    with caplog.at_level(logging.WARNING, logger="normlab.callbacks.resume"):
        fit(tmp_path, 2, tmp_path / "no_rng.ckpt")
    assert NOT_EXACT in caplog.text
