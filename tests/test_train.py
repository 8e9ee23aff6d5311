"""The Hydra entry points end to end: every norm in both models, loggers, checkpoints, eval."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from normlab.collect.wandb_runs import read_offline_run
from normlab.eval import evaluate
from normlab.norm import NORMS
from normlab.train import train
from normlab.utils.hydra_run import CONFIG_DIR

NORM_CONFIGS = sorted(path.stem for path in (CONFIG_DIR / "norm").glob("*.yaml"))
# Added with issue 20; their fast_dev_runs here are slow tests (tests/norm/test_small_batch_norms.py
# runs them with the detection and pix2pix models too).
SMALL_BATCH_NORMS = {"brn", "ghost_bn", "frn", "evonorm_b0", "evonorm_s0", "rms"}


def test_every_registered_norm_has_a_config_and_back():
    builtin = {"bn", "syncbn", "ln", "gn", "in", "frozen_bn", "none", "cuda_bn"}
    assert builtin | SMALL_BATCH_NORMS <= set(NORMS)
    assert set(NORM_CONFIGS) == builtin | SMALL_BATCH_NORMS


@pytest.mark.parametrize("model", ["densenet_bc_100", "convnext_atto"])
@pytest.mark.parametrize(
    "norm",
    [
        pytest.param(name, marks=pytest.mark.slow) if name in SMALL_BATCH_NORMS else name
        for name in NORM_CONFIGS
    ],
)
def test_fast_dev_run_trains_every_norm(compose_config, fast, model, norm):
    cfg = compose_config("debug=fdr", f"norm={norm}", f"model={model}", *fast)
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss"])
    assert 0.0 <= metrics["test/acc"] <= 1.0


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_short_run_writes_csv_wandb_tensorboard_checkpoint_and_evaluates(compose_config, tmp_path):
    cfg = compose_config(
        "debug=limit",
        "norm=gn",
        "logger=many",
        "callbacks.model_summary=null",
        "callbacks.progress_bar=null",
        "data.batch_size=16",
    )
    metrics = train(cfg)
    run_dir = Path(cfg.paths.output_dir)

    # CSV metrics, with the keys the dashboards rely on.
    rows = _read_csv(run_dir / "csv" / "metrics.csv")
    columns = set(rows[0])
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/acc"} <= columns
    # LearningRateMonitor, one curve per named parameter group.
    assert {"lr-AdamW/decay", "lr-AdamW/no_decay"} <= columns
    norms = [float(row["train/grad_norm"]) for row in rows if row.get("train/grad_norm")]
    assert len(norms) == 8 and all(n > 0 for n in norms)  # one per optimizer step

    # The wandb offline run: config, metric history, the confusion matrix and misclassified images.
    run = read_offline_run(run_dir / "wandb", wait=60)
    assert run.complete
    assert run.config["norm"]["name"] == "gn"
    assert run.config["model"]["_target_"] == "normlab.models.densenet_bc_100"
    assert len(run.config["git_sha"]) >= 7
    assert {
        "train/loss",
        "train/grad_norm",
        "val/acc",
        "test/acc",
        "val/confusion_matrix/_type",
        "val/misclassified/_type",
    } <= run.history_keys
    assert any(key.startswith("lr-AdamW") for key in run.history_keys)
    assert run.group == "default" and "norm=gn" in run.tags
    assert any("confusion_matrix" in path.name for path in run.media)

    # TensorBoard got the scalars and the images too.
    # (fit and test each write an event file; the accumulator reads the folder.)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    accumulator.Reload()
    assert {"train/loss", "val/acc"} <= set(accumulator.Tags()["scalars"])
    assert {"val/confusion_matrix", "val/misclassified"} <= set(accumulator.Tags()["images"])

    # Resolved config and git SHA in the run dir and inside the checkpoint.
    assert "name: gn" in (run_dir / "config_resolved.yaml").read_text()
    assert (run_dir / "git_sha.txt").read_text().strip()
    last = run_dir / "checkpoints" / "last.ckpt"
    stored = torch.load(last, map_location="cpu", weights_only=False)["normlab"]
    assert stored["config"]["norm"]["name"] == "gn"
    assert stored["git_sha"] == (run_dir / "git_sha.txt").read_text().strip()

    # normlab.eval rebuilds everything from the checkpoint and reproduces the test accuracy.
    best = next(path for path in (run_dir / "checkpoints").glob("epoch*.ckpt"))
    eval_cfg = compose_config(
        f"ckpt_path={best}",
        "logger=csv",
        "trainer.limit_test_batches=2",
        config_name="eval",
        run="eval",
    )
    evaluated = evaluate(eval_cfg)
    assert evaluated["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)


def test_imports_register_a_user_norm_for_the_run(compose_config, fast, tmp_path, monkeypatch):
    (tmp_path / "user_norms_for_test.py").write_text(
        "from torch import nn\n"
        "from normlab.norm import register_norm\n\n"
        "@register_norm('user_gn1')\n"
        "def user_gn1(num_features: int) -> nn.Module:\n"
        "    return nn.GroupNorm(1, num_features)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = compose_config("debug=fdr", "imports=[user_norms_for_test]", "norm=none", *fast)
    cfg.norm.name = "user_gn1"
    try:
        assert math.isfinite(train(cfg)["train/loss"])
    finally:
        NORMS.pop("user_gn1", None)


def test_missing_import_is_a_config_error(compose_config, fast):
    from normlab.errors import ConfigError

    cfg = compose_config("imports=[no_such_module_here]", *fast)
    with pytest.raises(ConfigError, match="imports: cannot import 'no_such_module_here'"):
        train(cfg)


@pytest.mark.parametrize("experiment", ["densenet_digits", "retinanet_digits", "pix2pix_digits"])
def test_the_model_summary_counts_flops_in_double_precision(compose_config, experiment):
    # The summary runs each task's example input through the model: it must come in the dtype the
    # precision gives the model's inputs (float64 under 64-true, as the DDP exactness tests use).
    cfg = compose_config(f"experiment={experiment}", "debug=fdr", "trainer.precision=64-true")
    metrics = train(cfg)
    assert metrics
    assert all(math.isfinite(value) for value in metrics.values())
