"""A resumed Optuna study is the same search (its defining overrides are stored with it), and a
trial cut off by an interruption is stored as failed and run again."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from cli import offline_env, run_train
from normlab.errors import ConfigError
from normlab.sweep import (
    INTERRUPTED,
    check_study_identity,
    rerun_interrupted,
    spent,
    stored_trials,
    study_identity,
)

QUICK = ("experiment=densenet_digits", "model=densenet_bc_40", "data.image_size=16", "debug=fdr")


def search(sweep_dir, *extra: str) -> tuple[str, ...]:
    return (
        *QUICK,
        "hparams_search=densenet_digits_optuna",
        "logger=csv",
        "hydra.sweeper.sampler.n_startup_trials=1",
        f"hydra.sweep.dir={sweep_dir}",
        *extra,
    )


def test_the_identity_leaves_out_logging_and_paths_only():
    arguments = ["norm=gn", "logger=csv", "experiment=x", "callbacks.progress_bar=null", "seed=3"]
    assert study_identity(arguments) == ["experiment=x", "norm=gn", "seed=3"]
    assert study_identity(["task/optimizer=sgd", "paths.log_dir=/x"]) == ["task/optimizer=sgd"]


def completed_study(identity: list[str]) -> optuna.Study:
    study = optuna.create_study(study_name="s")
    check_study_identity(study, identity)
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    study.tell(trial, 0.5)
    return study


def test_a_study_with_results_refuses_another_search_and_a_failed_one_takes_it():
    study = completed_study(["norm=bn"])
    check_study_identity(study, ["norm=bn"])  # the same search goes on
    with pytest.raises(ConfigError) as refused:
        check_study_identity(study, ["norm=gn"])
    message = str(refused.value)
    assert "holds 1 completed trials of another search" in message
    assert "only in the study: ['norm=bn']; only in this command: ['norm=gn']" in message

    failed = optuna.create_study(study_name="f")
    check_study_identity(failed, ["seed=abc"])
    failed.tell(failed.ask(), state=TrialState.FAIL)
    check_study_identity(failed, ["seed=1"])  # nothing to mix: the fixed command takes it over
    assert failed.user_attrs["fixed_overrides"] == ["seed=1"]


def test_an_interrupted_trial_is_stored_as_failed_and_queued_again():
    study = optuna.create_study()
    cut_off = study.ask()
    cut_off.suggest_float("x", 0, 1)
    assert rerun_interrupted(study) == 1
    first, queued = study.get_trials(deepcopy=False)
    assert first.state == TrialState.FAIL and first.user_attrs[INTERRUPTED]
    assert not spent(first)
    assert queued.state == TrialState.WAITING
    again = study.ask()
    assert again.number == queued.number
    assert again.suggest_float("x", 0, 1) == first.params["x"]


def test_rerunning_a_study_with_another_norm_is_refused_in_one_line(tmp_path):
    sweep_dir = tmp_path / "optuna"
    env = offline_env(OMP_NUM_THREADS="1")
    first = run_train(*search(sweep_dir, "hydra.sweeper.n_trials=1"), env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    storage = f"sqlite:///{sweep_dir}/optuna.db"

    other = run_train(*search(sweep_dir, "hydra.sweeper.n_trials=2", "norm=gn"), env=env)
    assert other.returncode == 2, other.stderr[-3000:]
    lines = [line for line in other.stderr.splitlines() if line.startswith("normlab: ")]
    assert len(lines) == 1 and "Traceback" not in other.stderr
    assert "only in this command: ['norm=gn']" in lines[0]
    assert "hydra.sweeper.study_name=lr_wd_smoothing" in lines[0]
    assert [t.state for t in stored_trials(storage, "lr_wd_smoothing")] == [TrialState.COMPLETE]


def test_a_sweep_reruns_the_trial_an_interruption_cut_off(tmp_path):
    sweep_dir = tmp_path / "optuna"
    sweep_dir.mkdir()
    storage = f"sqlite:///{sweep_dir}/optuna.db"
    # As a killed sweep leaves it: one trial RUNNING, at a point of the search space.
    study = optuna.create_study(study_name="lr_wd_smoothing", storage=storage, direction="maximize")
    cut_off = study.ask()
    cut_off.suggest_float("task.optimizer.lr", 3e-4, 3e-2, log=True)
    cut_off.suggest_float("task.optimizer.weight_decay", 1e-4, 0.3, log=True)
    cut_off.suggest_categorical("task.label_smoothing", [0.0, 0.05, 0.1])

    result = run_train(*search(sweep_dir, "hydra.sweeper.n_trials=1"), env=offline_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "0 of 1 trials done" in result.stdout + result.stderr
    first, rerun = stored_trials(storage, "lr_wd_smoothing")
    assert first.state == TrialState.FAIL and first.user_attrs[INTERRUPTED]
    assert rerun.state == TrialState.COMPLETE and rerun.params == first.params
    assert (sweep_dir / "trial_1").is_dir()  # numbered after the interrupted trial's job
