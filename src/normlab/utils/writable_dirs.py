"""Directories a run writes to: refused with one line naming them when they cannot be written
or their disk has no room left."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from normlab.errors import ConfigError

# Room a run needs before anything else is known: Hydra's config files and the first log lines.
# (train() checks for a whole checkpoint of the model once it is built.)
MIN_FREE_BYTES = 16 * 2**20


def mebibytes(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def check_free_space(directory: Path, needed: int, key: str, what: str) -> None:
    """ConfigError naming ``directory``, its free space and ``key`` when it has less than
    ``needed`` bytes free (``what`` says what they are for)."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise ConfigError(
            f"{directory} has {mebibytes(free)} free, {what} needs about {mebibytes(needed)}; "
            f"free space there or set {key} to a directory on a disk with room"
        )


def check_writable(directory: Path, key: str) -> None:
    """Create ``directory`` if needed and write and delete a file in it, and see that its disk
    has ``MIN_FREE_BYTES`` free; ConfigError naming it (and ``key``, the setting that places it)
    if not. A real write rather than ``os.access``, which says yes to root on a read-only mount
    (an empty file, which a full disk still takes: hence the free-space check)."""
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
    check_free_space(directory, MIN_FREE_BYTES, key, "a run's config and log files")


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
