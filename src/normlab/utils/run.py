"""Run bookkeeping: OmegaConf resolvers, git SHA, and the metadata stored with every checkpoint."""

from __future__ import annotations

import logging
import os
import subprocess
import uuid
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from normlab.utils.secrets import mask_secrets, mask_secrets_in_files, secret_values

CONFIG_DIR = Path(__file__).resolve().parents[3] / "conf"


def _not_an_advertisement(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("💡 Tip")


def quiet_dependency_warnings() -> None:
    """Silence notices from dependencies that users cannot act on or did not ask for."""
    # Lightning advertises its cloud services (litlogger, litmodels) at the start of every fit,
    # through the logger that lightning.pytorch (or, alone, lightning.fabric) sets up.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_not_an_advertisement)
    # Lightning's hint to prepend `srun`, given on any machine with Slurm's client tools: a run
    # started without srun here is meant to run in this process (hydra/launcher=slurm starts
    # Slurm jobs itself, and Lightning finds their tasks without the hint).
    warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system")
    # torch's ONNX exporter runs onnxscript's graph passes, which log each rewrite at INFO (~18
    # lines per export that say nothing about the exported file).
    for name in ("onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Lightning 2.6's pytree helper trips a torch>=2.10 deprecation on every run.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # faster-coco-eval prints COCO's whole 12-line summary at INFO after every evaluation; the
    # numbers are logged as metrics anyway.
    logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)


def _hydra_job() -> tuple[bool, str, str, str]:
    """(multirun?, sweep dir, job number, override_dirname) of the running Hydra job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False, "", "", ""
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN

    def field(key: str) -> str:  # job.num is unset outside multirun (and in --cfg printing)
        value = OmegaConf.select(hydra_cfg, key, default="")
        return "" if value is None else str(value)

    return multirun, field("sweep.dir"), field("job.num"), field("job.override_dirname")


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (a sweep)."""
    return _hydra_job()[0]


def run_group(experiment: str) -> str:
    """The wandb group: the experiment, or ``<experiment>-<sweep dir name>`` for a multirun job,
    so each sweep's runs sit together and apart from other sweeps of the same experiment."""
    multirun, sweep_dir, _, _ = _hydra_job()
    return f"{experiment}-{Path(sweep_dir).name}" if multirun else experiment


def run_name(experiment: str) -> str:
    """The wandb run name: the experiment, the job number in a sweep, and what the command line
    changed (Hydra's override_dirname, without keys that only place or decorate the run)."""
    multirun, _, number, overrides = _hydra_job()
    parts = [experiment, f"#{number}" if multirun else "", overrides]
    return " ".join(part for part in parts if part)


def hydra_overrides() -> list[str]:
    """The command-line overrides of the running Hydra job (empty outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def register_resolvers() -> None:
    """Resolvers used by conf/: registered once, before Hydra composes anything."""
    if not OmegaConf.has_resolver("wandb_offline"):
        # wandb stays offline (no network needed) unless the user asks for WANDB_MODE=online.
        OmegaConf.register_new_resolver(
            "wandb_offline", lambda: os.environ.get("WANDB_MODE", "offline") != "online"
        )
    for name, resolver in (("run_group", run_group), ("run_name", run_name)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


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
    return them, with the command-line overrides, for checkpoints and loggers. Secrets from the
    environment are masked in all of it (see :mod:`normlab.utils.secrets`)."""
    secrets = secret_values()
    resolved = mask_secrets(OmegaConf.to_container(cfg, resolve=True), secrets)
    overrides = mask_secrets(hydra_overrides(), secrets)
    if write:
        output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(resolved), output_dir / "config_resolved.yaml")
        (output_dir / "git_sha.txt").write_text(sha + "\n")
        mask_secrets_in_files(output_dir / ".hydra", secrets)
    return {"config": resolved, "git_sha": sha, "overrides": overrides}


def attach_wandb_run(
    cfg: DictConfig, output_dir: Path, resume_from: Path | None, *, write: bool = True
) -> str:
    """Give the run's wandb logger (if any) a run id and return it: the id stored in the resumed
    checkpoint or in ``<run dir>/wandb_id.txt`` when continuing a run (so wandb continues that
    run), else a new one, which is written there (``write``: rank 0 only)."""
    id_file = output_dir / "wandb_id.txt"
    run_id = None
    if resume_from is not None:
        # mmap: only the small "normlab" entry is read, not the weights Lightning loads next.
        checkpoint = torch.load(resume_from, map_location="cpu", weights_only=True, mmap=True)
        stored = checkpoint.get("normlab", {})
        run_id = stored.get("wandb_id")
        if run_id is None and id_file.is_file():
            run_id = id_file.read_text().strip()
    run_id = run_id or uuid.uuid4().hex[:12]  # wandb ids: letters and digits, unique per project
    if write:
        output_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
    for node in (cfg.get("logger") or {}).values():
        if node and str(node.get("_target_", "")).endswith("WandbLogger"):
            with open_dict(node):
                node.id = run_id
                node.resume = "allow" if resume_from is not None else None
    return run_id


class RunInfo(pl.Callback):
    """Stores the resolved config and git SHA inside every checkpoint under ``"normlab"``."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["normlab"] = self.info
