"""Optuna sweeps: what a resumed study has already done, and whether it is the same search.

The sweeper itself, ``ResumableOptunaSweeper``, lives in ``hydra_plugins.normlab_sweepers``
(Hydra only instantiates plugins from that namespace); ``conf/hparams_search/`` uses it.
"""

from __future__ import annotations

import logging
import warnings

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.trial import TrialState

from normlab.errors import ConfigError
from normlab.utils.run_identity import is_trajectory_neutral

log = logging.getLogger(__name__)

# Trials that used up budget. A trial found RUNNING when a sweep starts was cut off by an
# interruption (one sweep process runs a study at a time): rerun_interrupted stores it as FAIL,
# marked INTERRUPTED (not spent), and queues its parameters to run again.
SPENT_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
INTERRUPTED = "interrupted"
# The study attribute holding the command-line overrides that define its search.
IDENTITY = "fixed_overrides"


def stored_trials(storage: str, study_name: str) -> list[optuna.trial.FrozenTrial]:
    """The trials of ``study_name`` in ``storage``; empty if the study does not exist yet."""
    names = {summary.study_name for summary in optuna.get_all_study_summaries(storage)}
    if study_name not in names:
        return []
    return optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)


def spent(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether ``trial`` used up one of the study's ``n_trials``."""
    return trial.state in SPENT_STATES and not trial.user_attrs.get(INTERRUPTED)


def study_identity(arguments: list[str]) -> list[str]:
    """The command-line overrides of a sweep that define what it searches (every override but
    the trajectory-neutral ones of :mod:`normlab.utils.run_identity`: logging, paths, ...)."""
    parsed = OverridesParser.create().parse_overrides(arguments)
    return sorted(
        o.input_line for o in parsed if not is_trajectory_neutral(o.key_or_group.replace("/", "."))
    )


def check_study_identity(study: optuna.Study, identity: list[str]) -> None:
    """Refuse to add trials to a study that searched with other overrides once it has results
    (a ConfigError naming the differences); record ``identity`` on a new study, or on one whose
    trials all failed (a command fixed after its first trials failed)."""
    recorded = study.user_attrs.get(IDENTITY)
    if recorded == identity:
        return
    completed = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if recorded is not None and completed:
        ours, theirs = sorted(set(identity) - set(recorded)), sorted(set(recorded) - set(identity))
        raise ConfigError(
            f"hydra.sweeper.study_name={study.study_name}: the study holds {len(completed)} "
            f"completed trials of another search (only in the study: {theirs or 'nothing'}; "
            f"only in this command: {ours or 'nothing'}); rerun it with the study's overrides, "
            "or start a new study with another hydra.sweeper.study_name"
        )
    if recorded is None and completed:
        log.warning(
            "Study %r does not record the overrides it was run with (an older sweep): its "
            "trials are taken to be of this search",
            study.study_name,
        )
    elif recorded is not None:
        log.info(
            "Study %r: no trial completed yet; its search is now %s", study.study_name, identity
        )
    study.set_user_attr(IDENTITY, identity)


def rerun_interrupted(study: optuna.Study) -> int:
    """Store the study's RUNNING trials (cut off by an interruption) as FAIL, marked
    interrupted, and queue their parameters to run first; return how many there were."""
    interrupted = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    for trial in interrupted:
        study._storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
        study._storage.set_trial_state(trial._trial_id, TrialState.FAIL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.enqueue_trial(trial.params)
        log.info(
            "Trial %d was interrupted: stored as failed, its parameters run again", trial.number
        )
    return len(interrupted)
