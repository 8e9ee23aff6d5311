"""Helpers for the scripts under experiments/: run a training job timed, read its metrics back."""

from __future__ import annotations

import csv
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from normlab.utils.run import CONFIG_DIR

REPO_ROOT = CONFIG_DIR.parent


def run_training(experiment: str, overrides: list[str], run_dir: Path) -> float:
    """``python -m normlab.train experiment=<experiment> logger=csv <overrides>`` into ``run_dir``;
    returns the wall time in seconds (everything included: data generation, validation, test)."""
    command = [
        sys.executable,
        "-m",
        "normlab.train",
        f"experiment={experiment}",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    start = time.perf_counter()
    env = {**os.environ, "WANDB_MODE": "offline"}
    subprocess.run(command, cwd=REPO_ROOT, check=True, env=env)
    return time.perf_counter() - start


def study_run_dir(task: str, experiment: str) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d_%H-%M-%S")
    return REPO_ROOT / "logs" / task / experiment / f"study_{stamp}"


def saved_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides a run was started with (Hydra's .hydra/overrides.yaml)."""
    lines = (run_dir / ".hydra" / "overrides.yaml").read_text().splitlines()
    return [line.removeprefix("- ").strip("'\"") for line in lines if line.startswith("- ")]


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    """The rows of the run's CSV log (one per logging step; empty cells where nothing was logged)."""
    with (run_dir / "csv" / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def column(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    """``(epoch, value)`` for every row that logged ``key``."""
    return [(int(r["epoch"]), float(r[key])) for r in rows if r.get(key)]


def machine_line() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{os.cpu_count()} CPU cores ({platform.machine()}), {gpu}, torch {torch.__version__}, "
        f"{datetime.now(timezone.utc):%Y-%m-%d}"
    )
