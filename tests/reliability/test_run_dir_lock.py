"""One run at a time in a run dir: a second run refuses in one line naming the dir and the run
that holds it; a lock left by a run that died is taken over; a multirun's jobs (one process,
one dir each) do not lock each other out."""

from __future__ import annotations

import csv
import logging
import os
import socket
import time
from pathlib import Path

import pytest
import torch

from cli import TINY_DIGITS_RUN as TINY
from cli import offline_env, python_path_with, run_train, start_train
from normlab.errors import ConfigError
from normlab.train import train
from normlab.utils.run_lock import LOCK_FILE, RunDirLock, hold_run_dir

HOLDER = f"pid {os.getpid()} on {socket.gethostname()}"


def test_a_run_dir_in_use_is_refused_before_anything_is_written(compose_config):
    cfg = compose_config(*TINY, "resume=auto")
    run_dir = Path(cfg.paths.output_dir)
    other = RunDirLock(run_dir)  # another run, as far as flock is concerned
    other.acquire()
    try:
        with pytest.raises(ConfigError) as refused:
            train(cfg)
    finally:
        other.release()
    message = str(refused.value)
    assert f"hydra.run.dir={run_dir} is in use by a run that is still going ({HOLDER}" in message
    assert not (run_dir / "config_resolved.yaml").exists()
    assert not list((run_dir / "checkpoints").glob("*"))


def test_the_second_command_in_a_run_dir_stops_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    holder = RunDirLock(run_dir)
    holder.acquire()
    try:
        result = run_train(
            f"hydra.run.dir={run_dir}", *TINY, "resume=auto", env=offline_env(), timeout=300
        )
    finally:
        holder.release()
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("normlab:")] == [
        f"normlab: configuration error: hydra.run.dir={run_dir} is in use by a run that is still "
        f"going ({HOLDER}, lock {run_dir / LOCK_FILE}); wait for it to end, stop it, or choose "
        "another hydra.run.dir"
    ]


def test_a_lock_left_by_a_dead_run_is_taken_over_with_one_line(compose_config, caplog):
    cfg = compose_config(*TINY)
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True)
    # What a killed run leaves: its PID in the file, no flock (the system dropped it).
    (run_dir / LOCK_FILE).write_text("pid 4194304 on gone-host\n")
    with caplog.at_level(logging.INFO):
        train(cfg)
    taken = [r.getMessage() for r in caplog.records if "took over the lock" in r.getMessage()]
    assert taken == [
        f"took over the lock of {run_dir} from pid 4194304 on gone-host, which has ended"
    ]
    assert (run_dir / LOCK_FILE).read_text().strip() == HOLDER


def test_jobs_in_one_process_take_their_own_dirs_locks_in_turn(tmp_path):
    first, second = tmp_path / "0", tmp_path / "1"
    hold_run_dir(first)
    hold_run_dir(first)  # a run resumed in the same process keeps its lock
    with pytest.raises(ConfigError):
        RunDirLock(first).acquire()
    hold_run_dir(second)  # the next job: the first dir is free again
    free = RunDirLock(first)
    free.acquire()
    free.release()
    with pytest.raises(ConfigError):
        RunDirLock(second).acquire()
    hold_run_dir(tmp_path / "elsewhere")  # leave no lock held for other tests


WAIT_FOR_FILE = """
import time
from pathlib import Path
import lightning.pytorch as pl

class WaitAfterStep(pl.Callback):
    # After step `step`, wait until `path` exists (at most 10 minutes).

    def __init__(self, step, path):
        self.step, self.path = step, Path(path)

    def on_train_batch_end(self, trainer, *args):
        deadline = time.monotonic() + 600
        while trainer.global_step == self.step and not self.path.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
"""


def steps_logged(run_dir: Path) -> list[int]:
    with (run_dir / "csv" / "metrics.csv").open(newline="") as handle:
        return sorted({int(row["step"]) for row in csv.DictReader(handle) if row["train/loss"]})


@pytest.mark.slow
def test_two_identical_resume_auto_commands_one_runs_the_other_refuses(tmp_path):
    (tmp_path / "wait_for_test.py").write_text(WAIT_FOR_FILE)
    run_dir, go_on = tmp_path / "run", tmp_path / "second_done"
    command = (
        f"hydra.run.dir={run_dir}",
        *TINY,
        "trainer.limit_train_batches=20",
        "callbacks.last_checkpoint.every_n_train_steps=1",
        "resume=auto",
        # The first run holds still after step 2 until the second has tried.
        f"+callbacks.wait={{_target_:wait_for_test.WaitAfterStep,step:2,path:{go_on}}}",
    )
    env = offline_env(PYTHONPATH=python_path_with(tmp_path))
    first = start_train(*command, env=env)
    try:
        last = run_dir / "checkpoints" / "last.ckpt"
        while not last.is_file():
            assert first.poll() is None, first.communicate()[0][-3000:]
            time.sleep(0.1)
        second = run_train(*command, env=env, timeout=600)
    finally:
        go_on.touch()
        output = first.communicate(timeout=600)[0]
    assert first.returncode == 0, output[-3000:]
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"hydra.run.dir={run_dir} is in use by a run that is still going (pid {first.pid} " in (
        second.stderr
    )
    assert steps_logged(run_dir) == list(range(20))  # every step, once
    assert (run_dir / LOCK_FILE).read_text() == ""  # released at the end: nothing to take over
    assert torch.load(last, weights_only=True)["global_step"] == 20
