"""Evaluation entry point: ``python -m normlab.eval ckpt_path=logs/.../checkpoints/last.ckpt``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from normlab.errors import ConfigError
from normlab.train import exit_on_config_error, instantiate_data, instantiate_group
from normlab.utils.run import CONFIG_DIR, quiet_dependency_warnings, register_resolvers

log = logging.getLogger("normlab.eval")
register_resolvers()
quiet_dependency_warnings()


def load_run_info(ckpt_path: str) -> dict[str, Any]:
    """The resolved training config and git SHA stored in a normlab checkpoint."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path} does not exist")
    # Tensors and plain containers only: a checkpoint from elsewhere cannot run code on load.
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "normlab" not in checkpoint:
        raise ConfigError(f"ckpt_path={ckpt_path} was not written by normlab.train (no run config)")
    return checkpoint["normlab"]


def evaluate(cfg: DictConfig) -> dict[str, float]:
    pl.seed_everything(cfg.seed, workers=True)
    info = load_run_info(cfg.ckpt_path)
    trained = OmegaConf.create(info["config"])
    data_cfg = cfg.data if cfg.get("data") else trained.data
    datamodule = instantiate_data(data_cfg)
    module_class = get_class(trained.task._target_)
    module = module_class.load_from_checkpoint(cfg.ckpt_path, map_location="cpu", weights_only=True)
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=instantiate_group(cfg.get("logger")))
    log.info("evaluating %s (trained at git %s)", cfg.ckpt_path, info["git_sha"])
    trainer.test(module, datamodule=datamodule)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except Exception as error:
        exit_on_config_error(error)


if __name__ == "__main__":
    main()
