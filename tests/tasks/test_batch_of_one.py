"""A model that cannot train on one image (BatchNorm after ConvNeXt's global pooling) with a
training set that leaves a last batch of one: that batch is left out, with a log line, instead of
the epoch failing at its end (digits: 1,257 training images, batch 2, 4 or 8)."""

from __future__ import annotations

import logging

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cli import offline_env, run_train
from normlab.runs import fill_from_datamodule, instantiate_data

CONVNEXT_BN = ("experiment=convnext_digits", "norm=bn", "data.image_size=16", "logger=csv")


def built(compose_config, *overrides: str):
    cfg = compose_config(*CONVNEXT_BN, *overrides)
    datamodule = instantiate_data(cfg.data)
    fill_from_datamodule(cfg, datamodule)
    module = instantiate(OmegaConf.to_container(cfg.task, resolve=True), _recursive_=False)
    module.check_run(None, datamodule)
    return datamodule


@pytest.mark.parametrize("batch_size", [2, 8])
def test_a_last_batch_of_one_image_is_left_out_for_batch_norm(compose_config, caplog, batch_size):
    datamodule = built(compose_config, f"data.batch_size={batch_size}")
    with caplog.at_level(logging.INFO):
        loader = datamodule.train_dataloader()
    assert datamodule.train_size == 1257 and loader.drop_last
    assert len(loader) == 1257 // batch_size
    assert f"would hold 1 image (1257 images per process, data.batch_size={batch_size})" in (
        caplog.text
    )
    assert "(BatchNorm2d) gets input of shape (1, 320, 1, 1) for one image" in caplog.text
    assert not datamodule.val_dataloader().drop_last  # evaluation is in eval mode: every image


@pytest.mark.parametrize(
    "overrides",
    [("data.batch_size=16",), ("norm=ln", "data.batch_size=8")],  # remainder 9; LN takes one
    ids=["other_remainder", "layer_norm"],
)
def test_every_batch_is_kept_otherwise(compose_config, overrides):
    loader = built(compose_config, *overrides).train_dataloader()
    assert not loader.drop_last


@pytest.mark.slow
def test_convnext_with_batch_norm_trains_a_whole_epoch_whose_last_batch_holds_one_image(tmp_path):
    result = run_train(
        *CONVNEXT_BN,
        "data.batch_size=8",
        "trainer.max_epochs=1",
        "trainer.limit_val_batches=1",
        "test=false",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
        f"hydra.run.dir={tmp_path}",
        env=offline_env(OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "it is left out" in result.stdout + result.stderr
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
