"""What is recorded with every run: the code's commit and the resolved config, in the run dir
(a resumed run's later commands under ``resumes/<n>/``) and (through
:class:`~normlab.callbacks.checkpointing.RunInfo`) in every checkpoint."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from normlab.utils.hydra_run import hydra_overrides
from normlab.utils.run_identity import changed_keys
from normlab.utils.secrets import mask_secrets, mask_secrets_in_files, secret_values

# What the studies and benchmarks write into the checkout they run from: changing these is not
# changing the code, so a study run after another study's results were written stays clean.
MEASUREMENT_OUTPUTS = (
    "experiments/**/results*.md",
    "experiments/**/runs*.csv",
    "experiments/**/*.png",
    "experiments/bench/*.md",
)


def git_sha(directory: Path | str | None = None) -> str:
    """The commit of the code being run, with ``-dirty`` if tracked files other than measurement
    outputs (:data:`MEASUREMENT_OUTPUTS`) changed; else 'unknown'."""
    directory = directory or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ":(top)",
                *(f":(top,exclude,glob){pattern}" for pattern in MEASUREMENT_OUTPUTS),
            ],
            cwd=directory,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


# Each later command of a run (resume_mode=continue) records its config in <run dir>/resumes/<n>/:
# the first command's record, directly in the run dir, is never overwritten.
RESUMES_DIR = "resumes"


@dataclass(frozen=True)
class RunRecord:
    """What :func:`save_run_info` recorded: ``info`` for checkpoints and loggers, and
    ``config_file``, this command's resolved config."""

    info: dict[str, Any]
    config_file: Path


def _next_resume_dir(output_dir: Path) -> Path:
    taken = [int(p.name) for p in (output_dir / RESUMES_DIR).glob("*") if p.name.isdigit()]
    return output_dir / RESUMES_DIR / str(max(taken, default=0) + 1)


def save_run_info(
    cfg: DictConfig,
    output_dir: Path,
    sha: str,
    *,
    write: bool = True,
    continued: Mapping[str, Any] | None = None,
) -> RunRecord:
    """Write the resolved config and git SHA into the run dir (``write``: only rank 0 does);
    return them, with the command-line overrides, for checkpoints and loggers. Secrets from the
    environment are masked in all of it (see :mod:`normlab.utils.secrets`).

    ``continued``: the record stored in the checkpoint this command continues. The run keeps
    that record (its first command's config, SHA and overrides); this command's are written to
    the next ``resumes/<n>/`` and appended to the record's ``resumes`` list with the keys it
    changed (only trajectory-neutral ones pass :func:`~normlab.utils.run_identity.check_same_run`).
    """
    secrets = secret_values()
    resolved = mask_secrets(OmegaConf.to_container(cfg, resolve=True), secrets)
    overrides = mask_secrets(hydra_overrides(), secrets)
    if continued is None:
        record_dir = output_dir
        info = {"config": resolved, "git_sha": sha, "overrides": overrides}
    else:
        record_dir = _next_resume_dir(output_dir)
        segment = {
            "git_sha": sha,
            "overrides": overrides,
            "changes": changed_keys(continued["config"], resolved),
        }
        info = {
            key: continued[key] for key in ("config", "git_sha", "overrides") if key in continued
        }
        info["resumes"] = [*continued.get("resumes", []), segment]
    if write:
        record_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(resolved), record_dir / "config_resolved.yaml")
        (record_dir / "git_sha.txt").write_text(sha + "\n")
        mask_secrets_in_files(output_dir / ".hydra", secrets)
    return RunRecord(info, record_dir / "config_resolved.yaml")
