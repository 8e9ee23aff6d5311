"""Running normlab's entry points (and other modules of the repo) as a user does: a Python process
of their own, started from the repository root unless a test says otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def offline_env(**extra: str) -> dict[str, str]:
    """This process's environment with wandb offline and silent (no account, no network, no
    banner in the captured output), and ``extra`` on top."""
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **extra}


def python_path_with(directory: Path) -> str:
    """A PYTHONPATH that also imports from ``directory``: where a test writes the callbacks its
    subprocess names by ``_target_``."""
    return f"{directory}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"


def module_command(module: str, *args: str) -> list[str]:
    """``python -m module *args`` with this interpreter (the venv's)."""
    return [sys.executable, "-m", module, *args]


def run_module(
    module: str,
    *args: str,
    cwd: Path = REPO_ROOT,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m module *args`` to its end; stdout and stderr are captured as text.
    ``env=None`` passes this process's environment on unchanged."""
    return subprocess.run(
        module_command(module, *args),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_train(
    *args: str,
    cwd: Path = REPO_ROOT,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """``python -m normlab.train *args`` to its end (see run_module)."""
    return run_module("normlab.train", *args, cwd=cwd, env=env, timeout=timeout)


def start_train(*args: str, env: dict[str, str], cwd: Path = REPO_ROOT) -> subprocess.Popen[str]:
    """``python -m normlab.train *args`` in the background, stdout and stderr in one pipe."""
    return subprocess.Popen(
        module_command("normlab.train", *args),
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_train_with(
    directory: Path, module: str, source: str, *args: str, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """``run_train(*args)`` with wandb offline and ``source`` written to ``directory/module.py``,
    importable by the run: the callbacks a test injects by ``_target_``."""
    (directory / f"{module}.py").write_text(source)
    env = offline_env(PYTHONPATH=python_path_with(directory))
    return run_train(*args, env=env, timeout=timeout)


# The small DenseNet at 16 px, 3 batches of 8 and one validation batch: a whole run in seconds.
TINY_DIGITS_RUN = (
    "experiment=densenet_digits",
    "model=densenet_bc_40",
    "data.image_size=16",
    "data.batch_size=8",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "test=false",
    "logger=csv",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
)
