"""Evaluation entry point: ``python -m normlab.eval ckpt_path=logs/.../checkpoints/last.ckpt``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from normlab.callbacks.checkpointing import CheckpointPosition
from normlab.norm import NORM_STATISTICS
from normlab.ranges import check_choice
from normlab.runs import (
    check_data_fits,
    check_required,
    chosen_weights,
    exit_on_config_error,
    instantiate_data,
    instantiate_group,
    load_run_info,
    load_trained_module,
)
from normlab.utils.dependency_warnings import quiet_dependency_warnings
from normlab.utils.hydra_run import CONFIG_DIR, register_resolvers
from normlab.utils.run_info import git_sha, save_run_info
from normlab.validation import name_config_keys

log = logging.getLogger("normlab.eval")
register_resolvers()
quiet_dependency_warnings()


def write_coco_detections(
    module: pl.LightningModule, datamodule: pl.LightningDataModule, output_dir: Path
) -> Path | None:
    """``detections_<split>.json`` in COCO's results format for a detection module just tested
    on COCO-format data (None for other tasks or data)."""
    split_paths = getattr(datamodule, "split_paths", None)
    category_ids = getattr(datamodule, "category_ids", None)
    if not hasattr(module, "coco_detections") or split_paths is None or category_ids is None:
        return None
    split = Path(split_paths("test")[0]).name
    path = output_dir / f"detections_{split}.json"
    output_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(module.coco_detections(category_ids)))
    return path


# Data options that change how fast the test set is read, not what it holds.
_LOADING_ONLY = {"num_workers", "pin_memory", "persistent_workers", "eval_batch_size", "batch_size"}


def _yaml(value: object) -> str:
    return "null" if value is None else str(value)


def differences_from_training_test(
    trained: DictConfig, data_cfg: DictConfig, cfg: DictConfig
) -> list[str]:
    """``key=value (training: value)`` for every setting by which the evaluated test set differs
    from the one the training run tested on: the data's options and ``limit_test_batches``."""
    evaluated = {"data": OmegaConf.to_container(data_cfg, resolve=True)}
    evaluated["trainer"] = {"limit_test_batches": cfg.trainer.get("limit_test_batches")}
    differences = []
    for group, settings in evaluated.items():
        for key, value in settings.items():
            before = OmegaConf.select(trained, f"{group}.{key}", default=None)
            if key not in _LOADING_ONLY and value != before:
                differences.append(f"{group}.{key}={_yaml(value)} (training: {_yaml(before)})")
    return differences


def evaluated_data(trained: DictConfig, cfg: DictConfig) -> DictConfig:
    """The data config to test on: the training run's; a ``data=`` option's instead; or the
    training run's with the options given without one on top (``+data.eval_batch_size=8``)."""
    given = cfg.get("data")
    if not given:
        return trained.data
    if "_target_" in given:
        return given
    return OmegaConf.merge(trained.data, given)


@name_config_keys
def evaluate(cfg: DictConfig) -> dict[str, float]:
    check_required(cfg)
    norm_statistics = check_choice("norm_statistics", cfg.norm_statistics, NORM_STATISTICS)
    pl.seed_everything(cfg.seed, workers=True)
    info = load_run_info(cfg.ckpt_path, cfg.get("imports"))
    weights = chosen_weights(cfg.ckpt_path, info, cfg.get("weights"))
    trained = OmegaConf.create(info["config"])
    data_cfg = evaluated_data(trained, cfg)
    datamodule = instantiate_data(data_cfg)
    check_data_fits(cfg.ckpt_path, trained, datamodule)
    module = load_trained_module(cfg.ckpt_path, trained, weights)
    # This command's choice, whatever the training run validated with.
    module.eval_norm_statistics = norm_statistics
    output_dir = Path(cfg.paths.output_dir)
    # What training records too: the resolved (eval) config and the code's commit.
    save_run_info(cfg, output_dir, git_sha())
    position = CheckpointPosition(info["global_step"], info["epoch"])
    trainer: pl.Trainer = instantiate(
        cfg.trainer, logger=instantiate_group(cfg.get("logger")), callbacks=[position]
    )
    log.info(
        "evaluating %s (step %d, epoch %d; trained at git %s)",
        cfg.ckpt_path,
        info["global_step"],
        info["epoch"],
        info["git_sha"],
    )
    if differences := differences_from_training_test(trained, data_cfg, cfg):
        # Its metrics are not the training run's test metrics: say why they may differ.
        log.info("not the training run's test set: %s", "; ".join(differences))
    trainer.test(module, datamodule=datamodule)
    log.info("tested %s batches; results in %s", sum(trainer.num_test_batches), output_dir)
    if path := write_coco_detections(module, datamodule, output_dir):
        log.info("detections in COCO results format: %s", path)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except Exception as error:
        exit_on_config_error(error)


if __name__ == "__main__":
    main()
