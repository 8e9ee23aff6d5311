"""``callbacks=ema`` through the training entry point, for each task family: validation and test
log the raw model's metrics and the averaged model's beside them (``_ema``), the checkpoint
holds both models (pix2pix's discriminator is never averaged), ``ema.select`` decides what the
best checkpoint and the sweeps follow, and bad ``ema`` values stop the run in one line."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from normlab.errors import ConfigError
from normlab.tasks import ClassificationModule, DetectionModule, Pix2PixModule
from normlab.train import train
from normlab.utils.resume_selection import load_weights
from normlab.validation import apply_ema_selection, validate_config
from tiny_runs import SHORT_RUN, TASK_OVERRIDES, compose_run

EVALUATED = ("test=true", "trainer.limit_test_batches=1")
TASKS = {
    "classification": ClassificationModule.logged_metrics(num_classes=10),
    "detection": DetectionModule.logged_metrics(),
    "pix2pix": Pix2PixModule.logged_metrics(),
}


def _run(run_dir: Path, task: str, *overrides: str) -> dict[str, float]:
    try:
        cfg = compose_run(
            [*TASK_OVERRIDES[task], *SHORT_RUN, *EVALUATED, *overrides], "config", run_dir
        )
        return train(cfg)
    finally:
        GlobalHydra.instance().clear()


def _checkpoint(run_dir: Path, name: str = "last.ckpt") -> dict:
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, dict[str, float]]]:
    """One two-step run of each task with callbacks=ema: its run dir and final metrics."""
    done = {}
    for task in TASKS:
        run_dir = tmp_path_factory.mktemp(task) / "run"
        done[task] = run_dir, _run(run_dir, task, "callbacks=ema")
    return done


@pytest.mark.parametrize("task", list(TASKS))
def test_validation_and_test_log_the_raw_and_the_averaged_model(runs, task):
    _, metrics = runs[task]
    evaluated = [name for name in TASKS[task] if name.startswith(("val/", "test/"))]
    for name in evaluated:
        assert name in metrics, name
        assert f"{name}_ema" in metrics, name
    assert not any(name.startswith("train/") and name.endswith("_ema") for name in metrics)


@pytest.mark.parametrize("task", list(TASKS))
def test_the_checkpoint_holds_the_averaged_and_the_raw_model(runs, task):
    run_dir, _ = runs[task]
    checkpoint = _checkpoint(run_dir)
    averaged, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert averaged.keys() == raw.keys()
    # Two training batches: the first update copies, the second averages (warm-up decay > 0).
    pix2pix = task == "pix2pix"
    assert int(checkpoint["averaging_state"]["n_averaged"]) == 2
    assert checkpoint["callbacks"]["WeightEMA"] == {"latest_update_step": 4 if pix2pix else 2}
    averaged_networks = ("generator.",) if pix2pix else ("model.",)
    differ = [
        k for k in raw if k.startswith(averaged_networks) and not torch.equal(averaged[k], raw[k])
    ]
    assert differ, "the averaged weights are the raw ones"
    if pix2pix:  # the discriminator is never averaged: the raw one in both
        discriminator = [k for k in raw if k.startswith("discriminator.")]
        assert discriminator
        assert all(torch.equal(averaged[k], raw[k]) for k in discriminator)


def test_select_ema_makes_checkpoints_and_sweeps_follow_the_averaged_model(runs):
    run_dir, _ = runs["classification"]
    checkpoint = _checkpoint(run_dir)
    assert checkpoint["normlab"]["config"]["monitor"]["metric"] == "val/acc_ema"
    assert checkpoint["normlab"]["config"]["optimized_metric"] == "val/acc_best_ema"
    monitors = [state.get("monitor") for state in checkpoint["callbacks"].values()]
    assert "val/acc_ema" in monitors


def test_select_raw_and_a_model_without_running_statistics(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run_dir = tmp_path / "run"
    metrics = _run(run_dir, "classification", "callbacks=ema", "ema.select=raw", "norm=gn")
    assert "val/acc_ema" in metrics
    checkpoint = _checkpoint(run_dir)
    assert checkpoint["normlab"]["config"]["monitor"]["metric"] == "val/acc"
    assert "val/acc" in [state.get("monitor") for state in checkpoint["callbacks"].values()]
    said = [
        r.getMessage() for r in caplog.records if "no norm of this model keeps" in r.getMessage()
    ]
    assert len(said) == 1, said


def test_resume_mode_weights_loads_the_raw_weights_and_says_so(runs, caplog):
    caplog.set_level(logging.INFO)
    run_dir, _ = runs["classification"]
    path = run_dir / "checkpoints" / "last.ckpt"
    module = ClassificationModule.load_from_checkpoint(path, map_location="cpu")
    load_weights(module, path)
    raw = _checkpoint(run_dir)["current_model_state"]
    assert all(torch.equal(module.state_dict()[k], v) for k, v in raw.items())
    assert any(
        "loaded the raw (trained, not averaged) weights" in r.getMessage() for r in caplog.records
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ema.decay=1.5", "ema.decay must be a number in [0, 1], got 1.5"),
        ("ema.update_every_n_steps=0", "ema.update_every_n_steps must be an integer >= 1, got 0"),
        ("ema.recompute_images=0", "ema.recompute_images must be an integer >= 1, got 0"),
        ("ema.norm_buffers=mean", "ema.norm_buffers='mean' is not one of average, copy, recompute"),
        ("ema.select=best", "ema.select='best' is not one of ema, raw"),
    ],
)
def test_bad_ema_values_are_one_line_naming_the_key(compose_config, override, message):
    cfg = compose_config("callbacks=ema", override)
    with pytest.raises(ConfigError) as error:
        apply_ema_selection(cfg)
    assert str(error.value) == message
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(cfg)


def test_averaged_metrics_are_declared_only_with_the_callback(compose_config):
    cfg = compose_config("monitor.metric=val/acc_ema")
    with pytest.raises(
        ConfigError, match=re.escape("monitor.metric='val/acc_ema' is not a metric")
    ):
        validate_config(cfg)
    validate_config(compose_config("callbacks=ema", "monitor.metric=val/acc_ema"))
