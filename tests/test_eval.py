"""``normlab.eval`` leaves a record per checkpoint and data, as training does: its own folder
named after both, the checkpoint's step and epoch on its metrics, the resolved config and git SHA,
and a line saying when the evaluated test set is not the one the training run tested on; it
tests the weights ``weights=`` names and normalises as ``norm_statistics=`` says."""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cli import offline_env, run_module
from normlab.errors import ConfigError
from normlab.eval import differences_from_training_test, evaluate
from normlab.train import train
from normlab.utils.hydra_run import eval_dir_name
from normlab.utils.run_info import git_sha
from tiny_runs import tiny_checkpoint, with_ema_weights


def test_an_eval_dir_per_checkpoint_and_data_with_step_config_sha_and_what_differs(
    compose_config, fast, tmp_path
):
    cfg = compose_config("debug=limit", "model=densenet_bc_40", "data.image_size=16", *fast)
    train(cfg)
    best = next((Path(cfg.paths.output_dir) / "checkpoints").glob("epoch*.ckpt"))
    step = int(best.stem.split("step")[1])  # epoch000-step4 or epoch001-step8: 4 steps an epoch

    log_dir = tmp_path / "logs"
    # The whole test set (training tested 2 batches), of data named on the command line.
    result = run_module(
        "normlab.eval",
        f"ckpt_path={best}",
        "data=digits",
        "data.image_size=16",
        f"paths.log_dir={log_dir}",
        env=offline_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (log_dir / "eval").glob("*/*/*")
    assert run_dir.parent.relative_to(log_dir / "eval") == Path(f"run-{best.stem}/data=digits")
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    assert [(int(r["step"]), int(r["epoch"])) for r in rows] == [(step, step // 4 - 1)]
    assert OmegaConf.load(run_dir / "config_resolved.yaml").ckpt_path == str(best)
    assert (run_dir / "git_sha.txt").read_text().strip() == git_sha()
    lines = [
        line
        for line in (run_dir / "eval.log").read_text().splitlines()
        if "not the training run's test set" in line
    ]
    assert len(lines) == 1 and lines[0].endswith("trainer.limit_test_batches=null (training: 2)")


def test_the_test_set_differs_by_data_options_and_batch_limit_not_by_loading_options():
    trained = OmegaConf.create(
        {"data": {"root": "a", "batch_size": 8}, "trainer": {"limit_test_batches": 2}}
    )
    same = OmegaConf.create({"trainer": {"limit_test_batches": 2}})
    data = OmegaConf.create({"root": "a", "batch_size": 64})
    assert differences_from_training_test(trained, data, same) == []
    other = OmegaConf.create({"trainer": {"limit_test_batches": None}})
    assert differences_from_training_test(trained, OmegaConf.create({"root": "b"}), other) == [
        "data.root=b (training: a)",
        "trainer.limit_test_batches=null (training: 2)",
    ]


def test_eval_dirs_are_named_after_the_run_the_checkpoint_and_the_data():
    assert eval_dir_name("logs/x/2026-01-01/checkpoints/last.ckpt", None) == (
        "2026-01-01-last/data=training"
    )
    assert eval_dir_name("/somewhere/model.ckpt", "fashion_mnist") == "model/data=fashion_mnist"


# -- which weights and which norm statistics ---------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A DenseNet-BC-40 (BN) trained two steps, and the same run as an EMA checkpoint."""
    plain = tiny_checkpoint("classification", tmp_path_factory.mktemp("eval") / "run")
    return {"plain": plain, "ema": with_ema_weights(plain, plain.parent / "ema.ckpt")}


def _evaluated(compose_config, checkpoint: Path, *overrides: str) -> dict[str, float]:
    cfg = compose_config(
        f"ckpt_path={checkpoint}", "trainer.limit_test_batches=2", *overrides, config_name="eval"
    )
    return evaluate(cfg)


def _lines(caplog, start: str) -> list[str]:
    return [record.message for record in caplog.records if record.message.startswith(start)]


def test_eval_tests_the_ema_weights_where_the_checkpoint_holds_them(
    checkpoints, compose_config, caplog
):
    with caplog.at_level(logging.INFO):
        default = _evaluated(compose_config, checkpoints["ema"])
        assert _lines(caplog, "weights: ") == [
            "weights: ema (the checkpoint holds EMA and raw weights; weights=raw for the other)"
        ]
        raw = _evaluated(compose_config, checkpoints["ema"], "weights=raw")
        plain = _evaluated(compose_config, checkpoints["plain"])
        assert _lines(caplog, "weights: ")[-1] == (
            "weights: raw (the checkpoint holds no EMA weights)"
        )
    assert _evaluated(compose_config, checkpoints["ema"], "weights=ema") == default
    # The raw weights are the trained ones: those of the checkpoint without EMA.
    assert raw == plain and default["test/loss"] != raw["test/loss"]


@pytest.mark.parametrize(
    ("checkpoint", "override", "message"),
    [
        ("plain", "weights=ema", "weights=ema: ckpt_path={} holds no EMA weights"),
        ("ema", "weights=best", "weights='best' is not one of ema, raw"),
        ("plain", "norm_statistics=running", "norm_statistics='running' is not one of population"),
    ],
)
def test_a_bad_weights_or_norm_statistics_names_the_key(
    checkpoints, compose_config, checkpoint, override, message
):
    path = checkpoints[checkpoint]
    with pytest.raises(ConfigError, match=re.escape(message.format(path))):
        _evaluated(compose_config, path, override)


def test_eval_with_batch_statistics_says_so_and_differs_from_population(
    checkpoints, compose_config, caplog
):
    population = _evaluated(compose_config, checkpoints["plain"])
    with caplog.at_level(logging.INFO):
        batch = _evaluated(compose_config, checkpoints["plain"], "norm_statistics=batch")
    (line,) = _lines(caplog, "norm statistics: batch")
    assert "39 norm layers (BatchNorm2d ×39)" in line and "(8 images per process)" in line
    assert batch["test/loss"] != population["test/loss"]
    # Nothing the batch evaluation did stays in the module: population statistics again.
    assert _evaluated(compose_config, checkpoints["plain"]) == population
    # The normalization batch, set on top of the training run's data.
    with caplog.at_level(logging.INFO):
        _evaluated(
            compose_config, checkpoints["plain"], "norm_statistics=batch", "+data.eval_batch_size=3"
        )
    assert "(3 images per process)" in _lines(caplog, "norm statistics: batch")[-1]
