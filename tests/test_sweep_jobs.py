"""How the entry point ends a job that fails: a single run exits with its one line, a multirun job
raises JobFailed (Hydra records it, the sweep goes on). The sweeps themselves are run in
tests/test_sweeps.py; these check the entry point in-process, with ``train`` stubbed."""

from __future__ import annotations

import logging
import math

import pytest
from omegaconf import OmegaConf

import normlab.train
from normlab.errors import ConfigError, JobFailed, TrainingError

CFG = OmegaConf.create({"optimized_metric": "val/acc_best"})


@pytest.fixture
def in_a_sweep(monkeypatch):
    monkeypatch.setattr(normlab.train, "in_multirun", lambda: True)


@pytest.fixture
def in_an_optuna_sweep(monkeypatch, in_a_sweep):
    """A sweep whose sweeper chooses by the returned metric (a grid only runs the jobs)."""
    monkeypatch.setattr(normlab.train, "sweeper_reads_metric", lambda: True)


def stub_train(monkeypatch, outcome) -> None:
    def train(cfg):
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(normlab.train, "train", train)


def test_a_sweep_job_whose_metric_is_not_finite_fails(monkeypatch, in_an_optuna_sweep):
    stub_train(monkeypatch, {"val/acc_best": math.nan})
    with pytest.raises(JobFailed, match=r"^training stopped: optimized_metric val/acc_best=nan$"):
        normlab.train.main(CFG)


def test_a_grid_job_returns_a_metric_that_is_not_finite(monkeypatch, in_a_sweep):
    monkeypatch.setattr(normlab.train, "sweeper_reads_metric", lambda: False)
    stub_train(monkeypatch, {"val/acc_best": math.nan})
    assert math.isnan(normlab.train.main(CFG))


def test_a_single_run_still_returns_a_metric_that_is_not_finite(monkeypatch):
    stub_train(monkeypatch, {"val/acc_best": math.nan})
    assert math.isnan(normlab.train.main(CFG))


@pytest.mark.parametrize(
    ("error", "line", "code"),
    [
        (ConfigError("seed must be an integer"), "configuration error: seed must be an integer", 2),
        (
            TrainingError("non-finite loss at step 5"),
            "training stopped: non-finite loss at step 5",
            3,
        ),
    ],
)
def test_a_sweep_job_error_is_logged_and_raised_a_single_run_exits(
    monkeypatch, caplog, capsys, error, line, code
):
    stub_train(monkeypatch, error)
    with pytest.raises(SystemExit) as stop:
        normlab.train.main(CFG)
    assert stop.value.code == code
    assert capsys.readouterr().err == f"normlab: {line}\n"

    monkeypatch.setattr(normlab.train, "in_multirun", lambda: True)
    with caplog.at_level(logging.ERROR), pytest.raises(JobFailed) as failed:
        normlab.train.main(CFG)
    assert str(failed.value) == line
    assert [r.getMessage() for r in caplog.records] == [f"normlab: {line}"]
    assert capsys.readouterr().err == ""  # the one line went to the job's log, nothing else


def test_an_unexpected_error_fails_the_sweep_job_with_its_traceback_in_the_log(
    monkeypatch, caplog, in_a_sweep
):
    stub_train(monkeypatch, RuntimeError("CUDA out of memory\nmore detail"))
    with caplog.at_level(logging.ERROR), pytest.raises(JobFailed) as failed:
        normlab.train.main(CFG)
    assert str(failed.value) == "RuntimeError: CUDA out of memory"
    assert caplog.records[-1].exc_info is not None  # the traceback goes into the job's log
