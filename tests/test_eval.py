"""``normlab.eval`` leaves a record per checkpoint and data, as training does: its own folder
named after both, the checkpoint's step and epoch on its metrics, the resolved config and git SHA,
and a line saying when the evaluated test set is not the one the training run tested on."""

from __future__ import annotations

import csv
from pathlib import Path

from omegaconf import OmegaConf

from cli import offline_env, run_module
from normlab.eval import differences_from_training_test
from normlab.train import train
from normlab.utils.hydra_run import eval_dir_name
from normlab.utils.run_info import git_sha


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
