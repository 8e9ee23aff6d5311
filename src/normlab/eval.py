"""Evaluation entry point: ``python -m normlab.eval ckpt_path=logs/.../checkpoints/last.ckpt``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from normlab.runs import (
    check_data_fits,
    exit_on_config_error,
    instantiate_data,
    instantiate_group,
    load_run_info,
    load_trained_module,
)
from normlab.utils.dependency_warnings import quiet_dependency_warnings
from normlab.utils.hydra_run import CONFIG_DIR, register_resolvers
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


@name_config_keys
def evaluate(cfg: DictConfig) -> dict[str, float]:
    pl.seed_everything(cfg.seed, workers=True)
    info = load_run_info(cfg.ckpt_path, cfg.get("imports"))
    trained = OmegaConf.create(info["config"])
    data_cfg = cfg.data if cfg.get("data") else trained.data
    datamodule = instantiate_data(data_cfg)
    check_data_fits(cfg.ckpt_path, trained, datamodule)
    module = load_trained_module(cfg.ckpt_path, trained)
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=instantiate_group(cfg.get("logger")))
    log.info("evaluating %s (trained at git %s)", cfg.ckpt_path, info["git_sha"])
    trainer.test(module, datamodule=datamodule)
    if path := write_coco_detections(module, datamodule, Path(cfg.paths.output_dir)):
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
