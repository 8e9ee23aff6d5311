"""Values that crashed deep inside a run or were accepted although they train nothing (issue 32,
point 15): each stops the run at start with one line naming the key and what is allowed,
checked against the ranges the code declares (normlab.ranges)."""

from __future__ import annotations

from pathlib import Path

import pytest

from normlab.runs import exit_on_config_error
from normlab.train import train
from normlab.validation import validate_config

SMALL = ("model=densenet_bc_40", "data.image_size=16", "debug=fdr", "logger=csv")

BAD_VALUES = {
    "seed=-1": "seed must be an integer in [0, 4294967295] (or null for a random seed), got -1",
    "seed=99999999999999": "seed must be an integer in [0, 4294967295] (or null for a random "
    "seed), got 99999999999999",
    "trainer.max_steps=0": "trainer.max_steps must be an integer >= 1 or -1 (no limit), got 0",
    "trainer.max_epochs=0": "trainer.max_epochs must be an integer >= 1, -1 (no limit) or null, "
    "got 0",
    "task.label_smoothing=2": "task.label_smoothing must be a number in [0, 1], got 2",
    "task.max_nonfinite_fraction=2": "task.max_nonfinite_fraction must be a number in [0, 1], "
    "got 2",
    "task.optimizer.lr=inf": "task.optimizer.lr must be a number >= 0, got inf",
    "callbacks.last_checkpoint.every_n_train_steps=1.5": "callbacks.last_checkpoint."
    "every_n_train_steps must be null or an integer >= 1, got 1.5",
}


@pytest.mark.parametrize(("override", "message"), BAD_VALUES.items(), ids=BAD_VALUES.keys())
def test_a_bad_value_stops_the_run_at_start_in_one_line(
    override, message, compose_config, capsys, monkeypatch
):
    monkeypatch.setenv("NORMLAB_RUN_CONFIG", "")  # rank 0 would publish its config here
    cfg = compose_config(*SMALL, override)
    with pytest.raises(SystemExit) as stopped:
        try:
            train(cfg)
        except Exception as error:
            exit_on_config_error(error)
    stderr = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in stderr
    assert stderr.strip() == f"normlab: configuration error: {message}"
    assert not (Path(cfg.paths.output_dir) / "config_resolved.yaml").exists()  # nothing ran


def test_the_edges_of_the_ranges_are_allowed(compose_config):
    for override in (
        "seed=0",
        "seed=4294967295",
        "trainer.max_steps=-1",
        "trainer.max_epochs=-1",
        "trainer.max_epochs=null",
        "task.label_smoothing=1.0",
        "callbacks.last_checkpoint.every_n_train_steps=null",
    ):
        validate_config(compose_config(*SMALL, override))
