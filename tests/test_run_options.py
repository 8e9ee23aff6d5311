"""The run options lightning-hydra-template users look for, each composed and run on one batch:
extras (config tree, enforced tags, ignored warnings), debug=profiler, callbacks=none,
callbacks=early_stopping, trainer=mps, the norm study's Optuna search, wandb notes and
per-parameter gradient norms."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import optuna
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cli import offline_env, run_train
from normlab.errors import ConfigError
from normlab.sweep import stored_trials
from normlab.train import train

TINY = ("model=densenet_bc_40", "data.image_size=16", "data.batch_size=8", "logger=csv")


def test_extras_print_the_config_tree_enforce_tags_and_ignore_warnings(compose_config, capsys):
    extras = ("extras.print_config=true", "extras.enforce_tags=true", "debug=fdr", *TINY)
    with pytest.raises(ConfigError, match=r"extras.enforce_tags=true: .* tags=\[\.\.\.\]"):
        train(compose_config(*extras))
    with warnings.catch_warnings():  # ignore_warnings changes this process's filters
        metrics = train(compose_config(*extras, "tags=[probe]", "extras.ignore_warnings=true"))
        assert warnings.filters[0][0] == "ignore"
    assert math.isfinite(metrics["train/loss"])
    output = capsys.readouterr().out
    assert "config" in output and "├── task" in output
    assert "num_classes: 10" in output  # printed once the data filled it in


def test_debug_profiler_writes_its_report_into_the_run_dir(compose_config):
    cfg = compose_config("debug=profiler", "trainer.fast_dev_run=true", *TINY)
    train(cfg)
    report = (Path(cfg.paths.output_dir) / "fit-profile.txt").read_text()
    assert "run_training_batch" in report


def test_callbacks_none_runs_with_lightnings_defaults(compose_config):
    cfg = compose_config("callbacks=none", "debug=fdr", *TINY)
    assert OmegaConf.to_container(cfg.callbacks) in ({}, None)
    assert math.isfinite(train(cfg)["train/loss"])


def test_early_stopping_ends_training_at_its_threshold(compose_config):
    # debug=limit: 2 epochs of 4 steps; any accuracy reaches a threshold of 0.
    cfg = compose_config(
        "callbacks=early_stopping",
        "callbacks.early_stopping.stopping_threshold=0.0",
        "debug=limit",
        *TINY,
    )
    assert "early_stopping" not in compose_config("debug=fdr").callbacks  # off by default
    train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks the refusal without MPS")
def test_trainer_mps_composes_and_is_refused_in_one_line_without_mps(compose_config):
    cfg = compose_config("trainer=mps", "debug=fdr", *TINY)
    assert cfg.trainer.accelerator == "mps"
    with pytest.raises(ConfigError, match=r"^trainer.accelerator=mps: this machine has no Apple"):
        train(cfg)


def test_the_norm_study_optuna_search_tunes_brns_own_arguments(compose_config, tmp_path):
    study = compose_config(
        "experiment=fashion_norm_study", "hparams_search=fashion_norm_study_optuna"
    )
    assert study.norm.name == "brn" and study.data._target_.endswith("FashionMNISTDataModule")

    sweep_dir = tmp_path / "optuna"
    result = run_train(
        "experiment=densenet_digits",
        "hparams_search=fashion_norm_study_optuna",
        "debug=fdr",
        *TINY,
        "hydra.sweeper.n_trials=1",
        f"hydra.sweep.dir={sweep_dir}",
        env=offline_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (trial,) = stored_trials(f"sqlite:///{sweep_dir}/optuna.db", "brn_batch8")
    assert trial.state == optuna.trial.TrialState.COMPLETE
    config = OmegaConf.load(sweep_dir / "trial_0" / "config_resolved.yaml")
    assert config.norm.name == "brn"
    assert config.norm.momentum == trial.params["norm.momentum"]
    assert config.norm.r_max == trial.params["norm.r_max"]


def test_wandb_notes_reach_wandb_init(compose_config):
    cfg = compose_config("logger=wandb", "logger.wandb.notes='bn at batch 2, lr halved'")
    logger = instantiate(cfg.logger.wandb)
    assert logger._wandb_init["notes"] == "bn at batch 2, lr halved"


def test_per_parameter_gradient_norms_add_to_the_global_one(compose_config):
    cfg = compose_config(
        "callbacks.gradient_norm.per_parameter=true", "debug=limit", "trainer.max_epochs=1", *TINY
    )
    train(cfg)
    rows = list(csv.DictReader((Path(cfg.paths.output_dir) / "csv" / "metrics.csv").open()))
    row = next(row for row in rows if row.get("train/grad_norm"))
    per_parameter = {
        k: float(v) for k, v in row.items() if k.startswith("train/grad_norm/model.") and v
    }
    assert "train/grad_norm/model.classifier.weight" in per_parameter
    total = math.sqrt(sum(v * v for v in per_parameter.values()))
    assert total == pytest.approx(float(row["train/grad_norm"]), rel=1e-4)
