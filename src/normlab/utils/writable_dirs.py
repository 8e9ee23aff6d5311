"""Directories a run writes to: refused with one line naming them when they cannot be written."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from normlab.errors import ConfigError


def check_writable(directory: Path, key: str) -> None:
    """Create ``directory`` if needed and write and delete a file in it; ConfigError naming it
    (and ``key``, the setting that places it) if that fails. A real write rather than
    ``os.access``, which says yes to root on a read-only mount."""
    probe = directory / f".normlab-write-test.{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ConfigError(
            f"{directory} is not writable ({error.strerror or error}); set {key} to a directory "
            "this process can write"
        ) from error


class WritableRunDir(Callback):
    """Hydra callback: a run (sweep) dir that cannot be written stops the command with one line
    naming it, before Hydra creates it and sets up its log file there (a traceback otherwise)."""

    def _check(self, config: DictConfig, key: str) -> None:
        # The default dirs interpolate ${hydra:runtime.cwd}, which Hydra only answers once its
        # config is set; Hydra sets it again from the same object (same ${now:} value) right after.
        HydraConfig.instance().set_config(config)
        directory = OmegaConf.select(config, key)
        try:
            check_writable(Path(directory), key)
        except ConfigError as error:
            print(f"normlab: configuration error: {error}", file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")
