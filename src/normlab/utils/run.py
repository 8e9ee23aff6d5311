"""Run bookkeeping: OmegaConf resolvers, git SHA, and the metadata stored with every checkpoint."""

from __future__ import annotations

import logging
import os
import subprocess
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[3] / "conf"


def quiet_dependency_warnings() -> None:
    """Silence deprecation notices raised inside dependencies that users cannot act on."""
    # Lightning 2.6's pytree helper trips a torch>=2.10 deprecation on every run.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # faster-coco-eval prints COCO's whole 12-line summary at INFO after every evaluation; the
    # numbers are logged as metrics anyway.
    logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)


def register_resolvers() -> None:
    """Resolvers used by conf/: registered once, before Hydra composes anything."""
    if not OmegaConf.has_resolver("wandb_offline"):
        # wandb stays offline (no network needed) unless the user asks for WANDB_MODE=online.
        OmegaConf.register_new_resolver(
            "wandb_offline", lambda: os.environ.get("WANDB_MODE", "offline") != "online"
        )


def git_sha(directory: Path | str | None = None) -> str:
    """The commit of the code being run, with ``-dirty`` if tracked files changed; else 'unknown'."""
    directory = directory or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=directory,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def save_run_info(
    cfg: DictConfig, output_dir: Path, sha: str, *, write: bool = True
) -> dict[str, Any]:
    """Write the resolved config and git SHA into the run dir (``write``: only rank 0 does);
    return them for checkpoints."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if write:
        output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(resolved), output_dir / "config_resolved.yaml")
        (output_dir / "git_sha.txt").write_text(sha + "\n")
    return {"config": resolved, "git_sha": sha}


class RunInfo(pl.Callback):
    """Stores the resolved config and git SHA inside every checkpoint under ``"normlab"``."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["normlab"] = self.info
