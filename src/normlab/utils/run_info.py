"""What is recorded with every run: the code's commit and the resolved config, in the run dir
and (through :class:`~normlab.callbacks.checkpointing.RunInfo`) in every checkpoint."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from normlab.utils.hydra_run import hydra_overrides
from normlab.utils.secrets import mask_secrets, mask_secrets_in_files, secret_values


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
