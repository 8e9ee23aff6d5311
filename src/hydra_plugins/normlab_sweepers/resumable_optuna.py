"""``ResumableOptunaSweeper``: hydra-optuna-sweeper's sweeper, made to resume.

The plugin loads an existing study from its storage (``load_if_exists``) but then runs
``n_trials`` *more* trials, numbering their jobs from 0 again, so rerunning an interrupted sweep
overruns its budget and writes over the first trials' run dirs. This subclass counts the trials
the storage already holds: it runs only the missing ones and numbers new jobs after the old.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

from normlab.sweep import SPENT_STATES, stored_trials

log = logging.getLogger(__name__)

_SQLITE = "sqlite:///"


class ResumableOptunaSweeper(OptunaSweeper):
    """Same options as ``hydra/sweeper=optuna``, with ``storage`` and ``study_name`` required."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        impl = self.sweeper
        if not impl.storage or not impl.study_name:
            raise ValueError(
                "hydra.sweeper.storage and hydra.sweeper.study_name must be set for a resumable "
                "Optuna sweep (e.g. storage=sqlite:///${hydra.sweep.dir}/optuna.db)"
            )

    def sweep(self, arguments: list[str]) -> None:
        impl = self.sweeper
        storage = str(impl.storage)
        if storage.startswith(_SQLITE):
            # SQLAlchemy creates the database file but not its folder (the sweep dir, which the
            # launcher would only create with the first job).
            Path(storage.removeprefix(_SQLITE)).parent.mkdir(parents=True, exist_ok=True)
        trials = stored_trials(storage, impl.study_name)
        spent = sum(trial.state in SPENT_STATES for trial in trials)
        if trials:
            log.info(
                "Resuming study %r from %s: %d of %d trials done",
                impl.study_name,
                storage,
                spent,
                impl.n_trials,
            )
        impl.n_trials = max(0, impl.n_trials - spent)
        impl.job_idx = len(trials)
        if impl.n_trials == 0:
            log.info("Study %r has all its trials; nothing to run", impl.study_name)
            return
        super().sweep(arguments)
