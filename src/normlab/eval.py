"""Evaluation entry point: ``python -m normlab.eval ckpt_path=logs/.../checkpoints/last.ckpt``."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from normlab.errors import ConfigError
from normlab.train import exit_on_config_error, instantiate_data, instantiate_group
from normlab.utils.dependency_warnings import quiet_dependency_warnings
from normlab.utils.hydra_run import CONFIG_DIR, register_resolvers

log = logging.getLogger("normlab.eval")
register_resolvers()
quiet_dependency_warnings()


# torch.save has written zip archives since torch 1.6; a file that starts like one but does not
# load was cut short or damaged.
_ZIP_MAGIC = b"PK\x03\x04"


def _why_unreadable(path: Path, error: Exception) -> str:
    if path.stat().st_size == 0:
        return "the file is empty"
    if isinstance(error, pickle.UnpicklingError) and "weights_only" in str(error):
        return (
            "it holds objects other than tensors and plain containers, which "
            "torch.load(weights_only=True) refuses to unpickle"
        )
    with path.open("rb") as handle:
        if handle.read(4) != _ZIP_MAGIC:
            return "not a checkpoint written by torch.save"
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"truncated or corrupt ({first_line})"


def load_run_info(ckpt_path: str) -> dict[str, Any]:
    """The resolved training config and git SHA stored in a normlab checkpoint; a ConfigError
    naming the file when it is missing, unreadable or not one of ours."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path} does not exist")
    try:
        # Tensors and plain containers only: a checkpoint from elsewhere cannot run code on load.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch reports a bad file as whatever its unpickler hit
        raise ConfigError(
            f"ckpt_path={ckpt_path} cannot be read: {_why_unreadable(path, error)}"
        ) from None
    if not isinstance(checkpoint, dict) or "normlab" not in checkpoint:
        raise ConfigError(f"ckpt_path={ckpt_path} was not written by normlab.train (no run config)")
    return checkpoint["normlab"]


# What a model takes from its data, and where the trained config holds it (model.* where the
# model was given it, data.* otherwise).
_DATA_PROPERTIES = {
    "num_classes": "classes",
    "in_channels": "input channels",
    "out_channels": "output channels",
    "image_size": "image size",
}


def _trained_value(trained: DictConfig, name: str) -> Any:
    for key in (f"model.{name}", f"data.{name}"):
        value = OmegaConf.select(trained, key, default=None, throw_on_missing=False)
        if value is not None:
            return value
    return None


def check_data_fits(ckpt_path: str, trained: DictConfig, datamodule: object) -> None:
    """Refuse data the checkpoint's model was not trained for (another channel count, class
    count or image size): a model evaluated on it fails with a shape error deep inside the
    network, or worse, runs and reports the accuracy of labels it never learned."""
    for name, what in _DATA_PROPERTIES.items():
        want, got = _trained_value(trained, name), getattr(datamodule, name, None)
        if want is None or got is None or want == got:
            continue
        data = type(datamodule).__name__
        if name == "num_classes" and getattr(datamodule, "class_names", None):
            names = list(datamodule.class_names)
            got = f"{got} ({', '.join(map(str, names[:5]))}{', ...' if len(names) > 5 else ''})"
        hint = f"; set data.image_size={want}" if name == "image_size" else ""
        raise ConfigError(
            f"ckpt_path={ckpt_path} does not fit the data: its model was trained with {what} "
            f"{want}, the data ({data}) has {what} {got}{hint}"
        )


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


def evaluate(cfg: DictConfig) -> dict[str, float]:
    pl.seed_everything(cfg.seed, workers=True)
    info = load_run_info(cfg.ckpt_path)
    trained = OmegaConf.create(info["config"])
    data_cfg = cfg.data if cfg.get("data") else trained.data
    datamodule = instantiate_data(data_cfg)
    check_data_fits(cfg.ckpt_path, trained, datamodule)
    module_class = get_class(trained.task._target_)
    module = module_class.load_from_checkpoint(cfg.ckpt_path, map_location="cpu", weights_only=True)
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
