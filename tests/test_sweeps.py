"""Sweeps from the command line: a multirun grid with one grouped wandb run per job, a resumable
Optuna search, and the submitit launcher running jobs as separate processes; in each, a job that
fails is recorded as failed, the other jobs run and the sweep exits 1 with a list of the failed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf

from cli import offline_env, run_train
from normlab.collect.wandb_runs import read_offline_run
from normlab.sweep import stored_trials

# One batch of everything, on the small DenseNet: what is tested here is the sweep machinery.
QUICK = ("experiment=densenet_digits", "model=densenet_bc_40", "data.image_size=16", "debug=fdr")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_train(*args, env=offline_env(HYDRA_FULL_ERROR="1"))


def job_dirs(sweep_dir: Path, prefix: str = "") -> list[Path]:
    return sorted(
        (p for p in sweep_dir.iterdir() if p.is_dir() and p.name.removeprefix(prefix).isdigit()),
        key=lambda p: int(p.name.removeprefix(prefix)),
    )


SEED_ERROR = "configuration error: seed must be an integer (or null for a random seed), got 'abc'"


def outcome(job: Path) -> dict:
    return json.loads((job / "job_outcome.json").read_text())


def summary_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("normlab: ")]


def test_a_failed_job_does_not_stop_the_grid_and_the_sweep_lists_it(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_cli("-m", *QUICK, "logger=csv", "seed=1,abc,2,3", f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 1, result.stderr[-3000:]
    jobs = job_dirs(sweep_dir)
    assert [job.name for job in jobs] == ["0", "1", "2", "3"]
    # The three good jobs ran to the end (their config, metrics and outcome are there)...
    for job in (jobs[0], jobs[2], jobs[3]):
        assert outcome(job)["status"] == "completed"
        assert (job / "config_resolved.yaml").is_file()
        assert (job / "csv").is_dir()
    # ...and the bad one stopped at once, its one line in its own log and in the summary.
    assert outcome(jobs[1])["status"] == "failed"
    assert outcome(jobs[1])["error"] == SEED_ERROR
    assert not (jobs[1] / "config_resolved.yaml").exists()
    log_lines = (jobs[1] / "train.log").read_text().splitlines()
    errors = [line for line in log_lines if "ERROR" in line]
    assert len(errors) == 1 and errors[0].endswith(f"normlab: {SEED_ERROR}")
    assert "Traceback" not in (jobs[1] / "train.log").read_text()
    assert summary_lines(result.stderr) == [
        f"normlab: sweep {sweep_dir}: 1 of 4 jobs failed (each job's job_outcome.json and log "
        "say more):",
        f"normlab:   job 1 (seed=abc): {SEED_ERROR}",
    ]


def test_grid_gives_each_job_a_run_dir_and_a_wandb_run_grouped_by_sweep(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "-m",
        *QUICK,
        "norm=bn,gn",
        "data.batch_size=4,8",
        "logger=wandb",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]

    jobs = job_dirs(sweep_dir)
    assert [job.name for job in jobs] == ["0", "1", "2", "3"]
    expected = {("bn", 4), ("bn", 8), ("gn", 4), ("gn", 8)}
    seen = set()
    for job in jobs:
        config = OmegaConf.load(job / "config_resolved.yaml")
        norm, batch = config.norm.name, config.data.batch_size
        seen.add((norm, batch))

        run = read_offline_run(job / "wandb", wait=60)
        assert run.complete
        assert run.group == f"densenet_digits-{sweep_dir.name}"
        assert {"classification", "densenet_bc_40", f"norm={norm}", f"batch={batch}"} <= set(
            run.tags
        )
        assert run.job_type == "debug"
        assert run.name.startswith(f"densenet_digits #{job.name} ")
        assert f"norm={norm}" in run.name and f"data.batch_size={batch}" in run.name
        assert run.config["norm"]["name"] == norm
        assert f"norm={norm}" in run.config["overrides"]
        assert run.config["git_sha"] == (job / "git_sha.txt").read_text().strip()
    assert seen == expected


def test_optuna_search_stores_trials_in_sqlite_and_resumes(tmp_path):
    sweep_dir = tmp_path / "optuna"
    search = (
        *QUICK,
        "hparams_search=densenet_digits_optuna",
        "logger=csv",
        "hydra.sweeper.sampler.n_startup_trials=1",
        f"hydra.sweep.dir={sweep_dir}",
    )
    storage = f"sqlite:///{sweep_dir}/optuna.db"

    # Interrupted after one of two trials: the first invocation is given a budget of one.
    first = run_cli(*search, "hydra.sweeper.n_trials=1")
    assert first.returncode == 0, first.stderr[-3000:]
    trials = stored_trials(storage, "lr_wd_smoothing")
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE]

    resumed = run_cli(*search, "hydra.sweeper.n_trials=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1 of 2 trials done" in resumed.stdout + resumed.stderr
    trials = stored_trials(storage, "lr_wd_smoothing")
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    # New jobs are numbered after the stored ones: no run dir was written twice.
    assert [job.name for job in job_dirs(sweep_dir, "trial_")] == ["trial_0", "trial_1"]
    for trial, job in zip(trials, job_dirs(sweep_dir, "trial_"), strict=True):
        config = OmegaConf.load(job / "config_resolved.yaml")
        assert config.task.optimizer.lr == trial.params["task.optimizer.lr"]
        assert 3e-4 <= config.task.optimizer.lr <= 3e-2
        # Each trial's value is the metric the entry point returned (a validation accuracy).
        assert 0.0 <= trial.value <= 1.0


# Slow (25 s, two sweeps of three trials): make test keeps a failed Optuna trial
# (test_optuna_still_fails_a_trial_that_logged_no_metric) and an Optuna resume (above).
@pytest.mark.slow
def test_a_failed_trial_is_stored_as_failed_and_the_resumed_study_proposes_new_points(tmp_path):
    sweep_dir = tmp_path / "optuna"
    search = (
        *QUICK,
        "hparams_search=densenet_digits_optuna",
        "logger=csv",
        f"hydra.sweep.dir={sweep_dir}",
    )
    storage = f"sqlite:///{sweep_dir}/optuna.db"

    # A first invocation whose one trial fails: stored as FAIL, the sweep says so and exits 1.
    first = run_cli(*search, "hydra.sweeper.n_trials=1", "seed=abc")
    assert first.returncode == 1, first.stderr[-3000:]
    # A sweep of one job lists all its overrides: the trial's parameters and the bad seed.
    failed_line = summary_lines(first.stderr)[-1]
    assert failed_line.startswith("normlab:   job 0 (task.optimizer.lr=")
    assert failed_line.endswith(f" seed=abc): {SEED_ERROR}")
    trials = stored_trials(storage, "lr_wd_smoothing")
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL]

    # Resumed with the full budget of three: the failed trial counts, two more run and complete
    # (the failure of an earlier invocation does not fail this one).
    resumed = run_cli(*search, "hydra.sweeper.n_trials=3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1 of 3 trials done" in resumed.stdout + resumed.stderr
    trials = stored_trials(storage, "lr_wd_smoothing")
    states = [t.state for t in trials]
    assert states == [optuna.trial.TrialState.FAIL] + [optuna.trial.TrialState.COMPLETE] * 2
    # The seeded sampler did not start its sequence again: no trial repeats another's point.
    points = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(points)) == 3, points


def test_submitit_local_launcher_runs_two_jobs_in_their_own_processes(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "-m",
        *QUICK,
        "hydra/launcher=local",
        "norm=bn,gn",
        "logger=csv",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = job_dirs(sweep_dir)
    assert [OmegaConf.load(job / "config_resolved.yaml").norm.name for job in jobs] == ["bn", "gn"]
    # submitit ran each job as its own process and kept its log and pickled result.
    submitit = sweep_dir / ".submitit"
    assert len(list(submitit.glob("*/*_result.pkl"))) == 2
    logs = [path.read_text() for path in submitit.glob("*/*_log.out")]
    assert len(logs) == 2
    assert all("Job completed successfully" in text for text in logs)


@pytest.mark.slow
def test_submitit_local_launcher_runs_the_other_job_when_one_fails(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "-m",
        *QUICK,
        "hydra/launcher=local",
        "seed=abc,1",
        "logger=csv",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 1, result.stderr[-3000:]
    jobs = job_dirs(sweep_dir)
    assert [outcome(job)["status"] for job in jobs] == ["failed", "completed"]
    assert "Traceback" not in (jobs[0] / "train.log").read_text()
    assert summary_lines(result.stderr)[-1] == f"normlab:   job 0 (seed=abc): {SEED_ERROR}"


# Jobs that stop after two steps of a four-batch epoch: before their first validation, so they
# log no val/acc_best (the optimized_metric).
BEFORE_VALIDATION = (
    "trainer.max_steps=2",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=1",
    "test=false",
    "logger=csv",
)


def test_a_grid_of_runs_shorter_than_an_epoch_completes_and_lists_the_missing_metric(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "-m", *QUICK[:3], *BEFORE_VALIDATION, "seed=1,2", f"hydra.sweep.dir={sweep_dir}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = job_dirs(sweep_dir)
    assert [outcome(job)["status"] for job in jobs] == ["completed", "completed"]
    assert [outcome(job)["missing_metric"] for job in jobs] == ["val/acc_best"] * 2
    output = result.stdout + result.stderr
    assert "sweep: jobs 0, 1 did not log val/acc_best" in output
    assert "sweep finished: 2 of 2 jobs completed" in output


def test_optuna_still_fails_a_trial_that_logged_no_metric(tmp_path):
    sweep_dir = tmp_path / "optuna"
    result = run_cli(
        *QUICK[:3],
        *BEFORE_VALIDATION,
        "hparams_search=densenet_digits_optuna",
        "hydra.sweeper.n_trials=1",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "optimized_metric='val/acc_best' was not logged" in summary_lines(result.stderr)[-1]
    trials = stored_trials(f"sqlite:///{sweep_dir}/optuna.db", "lr_wd_smoothing")
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL]
