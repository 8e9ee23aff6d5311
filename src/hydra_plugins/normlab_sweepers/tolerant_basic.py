"""``TolerantBasicSweeper``: Hydra's grid sweeper that runs every job of the grid.

Hydra's basic sweeper reads each finished job's return value, which re-raises the job's
exception, so the first failed job ends the sweep. This one leaves failed jobs as they are
(Hydra has recorded them as failed) and goes on; ``normlab.utils.sweep_report.SweepReport``
lists them when the sweep ends and makes the sweep exit non-zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from omegaconf import OmegaConf


class TolerantBasicSweeper(BasicSweeper):
    """Same options as ``hydra/sweeper=basic`` (``max_batch_size``, ``params``)."""

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        assert self.config is not None and self.launcher is not None
        assert self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([*self._parse_config(), *arguments])
        self.overrides = self.split_arguments(overrides, self.max_batch_size)

        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        returns = []
        first_job = 0
        while not self.is_done():
            batch = self.get_job_batch()
            # Every job's config is composed before any of the batch runs: a group option that
            # does not exist stops the sweep at once rather than after hours of other jobs.
            self.validate_batch_is_legal(batch)
            returns.append(self.launcher.launch(batch, initial_job_idx=first_job))
            first_job += len(batch)
        return returns
