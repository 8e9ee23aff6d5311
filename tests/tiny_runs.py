"""Configs composed as the entry points compose them, and checkpoints of one or two training steps
of each task, made in this process, for the tests of eval and export."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from normlab.train import train
from normlab.utils.hydra_run import CONFIG_DIR

# Small networks on small generated data sets: each trains in a few seconds on one core.
TASK_OVERRIDES = {
    "classification": ["model=densenet_bc_40", "data.image_size=16", "data.batch_size=8"],
    "detection": [
        "experiment=retinanet_digits",
        "model.fpn_channels=16",
        "model.head_norm=null",
        "data.batch_size=2",
        *(f"data.num_{split}=4" for split in ("train", "val", "test")),
    ],
    "pix2pix": [
        "experiment=pix2pix_digits",
        "model.generator.ngf=4",
        "model.discriminator.ndf=4",
        "data.batch_size=2",
        *(f"data.num_{split}=4" for split in ("train", "val", "test")),
    ],
}
SHORT_RUN = [
    "logger=csv",
    "callbacks.model_summary=null",
    "callbacks.progress_bar=null",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "test=false",
]


def compose_run(overrides: list[str], config_name: str, output_dir: Path) -> DictConfig:
    """The config ``python -m normlab.<config_name> *overrides`` gets, writing to
    ``output_dir`` (data generated under its parent's ``data/``)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.runtime.cwd = str(output_dir.parent)
        cfg.paths.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def tiny_checkpoint(task: str, run_dir: Path, *overrides: str) -> Path:
    """``last.ckpt`` of a two-step ``task`` run in ``run_dir``."""
    try:
        train(compose_run([*TASK_OVERRIDES[task], *SHORT_RUN, *overrides], "config", run_dir))
    finally:
        GlobalHydra.instance().clear()
    return run_dir / "checkpoints" / "last.ckpt"


def with_ema_weights(checkpoint: Path, path: Path) -> Path:
    """``checkpoint`` as Lightning's weight averaging (EMA) writes one, at ``path``: its weights
    as ``current_model_state`` (the raw ones) and, as ``state_dict``, "averaged" ones: its
    float weights moved by seeded noise (running statistics as they are), so that outputs tell
    the two apart."""
    data = torch.load(checkpoint, map_location="cpu", weights_only=True)
    raw = data["state_dict"]
    generator = torch.Generator().manual_seed(0)

    def averaged(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point() or ".running_" in name:
            return tensor.clone()
        return tensor + 0.05 * torch.randn(tensor.shape, generator=generator)

    data["state_dict"] = {name: averaged(name, tensor) for name, tensor in raw.items()}
    data["current_model_state"] = raw
    data["averaging_state"] = {"n_averaged": torch.tensor(2)}
    torch.save(data, path)
    return path
