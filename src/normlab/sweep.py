"""Optuna sweeps: what a resumed study has already done.

The sweeper itself, ``ResumableOptunaSweeper``, lives in ``hydra_plugins.normlab_sweepers``
(Hydra only instantiates plugins from that namespace); ``conf/hparams_search/`` uses it.
"""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

# Trials that used up budget; RUNNING ones were cut off by an interruption and are run again.
SPENT_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def stored_trials(storage: str, study_name: str) -> list[optuna.trial.FrozenTrial]:
    """The trials of ``study_name`` in ``storage``; empty if the study does not exist yet."""
    names = {summary.study_name for summary in optuna.get_all_study_summaries(storage)}
    if study_name not in names:
        return []
    return optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)
