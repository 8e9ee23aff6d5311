"""``ResumableOptunaSweeper``: hydra-optuna-sweeper's sweeper, made to resume.

The plugin loads an existing study from its storage (``load_if_exists``) but then runs
``n_trials`` *more* trials, numbering their jobs from 0 again, so rerunning an interrupted sweep
overruns its budget and writes over the first trials' run dirs. This subclass counts the trials
the storage already holds: it runs only the missing ones and numbers new jobs after the old.
A seeded sampler would also start its sequence again and propose the first trials' points once
more, so a resumed study's sampler gets a seed that counts the stored trials.

A failed trial (its job failed, or its metric was not finite) is stored as FAIL and the study goes
on, as long as ``max_failure_rate`` allows (the hparams_search configs set 1.0: never stop). A
trial cut off by an interruption (left RUNNING) is stored as FAIL, marked interrupted, and its
parameters run again first; it does not count against ``n_trials``.

A study is one search: the command-line overrides that define it (all but logging and paths, see
:func:`normlab.sweep.study_identity`) are stored with it, and a rerun with other overrides
(``norm=gn`` on a bn study) stops in one line instead of adding its trials to the other search.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import optuna
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import DictConfig
from optuna.trial import TrialState

from normlab.errors import ConfigError
from normlab.runs import exit_on_config_error
from normlab.sweep import check_study_identity, rerun_interrupted, stored_trials, study_identity
from normlab.sweep import spent as spent_trial

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

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.sampler_config = config.hydra.sweeper.sampler

    def sweep(self, arguments: list[str]) -> None:
        impl = self.sweeper
        storage = str(impl.storage)
        if storage.startswith(_SQLITE):
            # SQLAlchemy creates the database file but not its folder (the sweep dir, which the
            # launcher would only create with the first job).
            Path(storage.removeprefix(_SQLITE)).parent.mkdir(parents=True, exist_ok=True)
        study = optuna.create_study(
            study_name=impl.study_name,
            storage=storage,
            directions=impl._get_directions(),
            load_if_exists=True,
        )
        try:
            check_study_identity(study, study_identity(arguments))
        except ConfigError as error:
            exit_on_config_error(error)
        trials = study.get_trials(deepcopy=False)
        if rerun_interrupted(study):
            trials = study.get_trials(deepcopy=False)
        spent = sum(map(spent_trial, trials))
        if trials:
            log.info(
                "Resuming study %r from %s: %d of %d trials done",
                impl.study_name,
                storage,
                spent,
                impl.n_trials,
            )
        impl.n_trials = max(0, impl.n_trials - spent)
        # Jobs are numbered after every stored trial, so no run dir is written twice (the
        # reruns of interrupted trials were queued as new trials).
        impl.job_idx = sum(trial.state != TrialState.WAITING for trial in trials)
        if impl.n_trials == 0:
            log.info("Study %r has all its trials; nothing to run", impl.study_name)
            return
        seed = self.sampler_config.get("seed")
        if trials and seed is not None:
            impl.sampler = instantiate(self.sampler_config, seed=seed + len(trials))
        first_job = impl.job_idx
        try:
            super().sweep(arguments)
        except ValueError:
            # Optuna's study.best_trial, read after the last trial, fails when no trial
            # completed; the failed jobs are what SweepReport reports.
            after = stored_trials(storage, impl.study_name)
            if impl.job_idx == first_job or any(t.state == TrialState.COMPLETE for t in after):
                raise
            log.warning("Study %r: no trial completed, no best parameters", impl.study_name)
