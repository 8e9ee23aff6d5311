"""Ctrl-C (SIGINT) and the pre-emption signal: before training a run ends in one line with exit
code 130; once a Trainer runs, the first signal stops it at the next batch boundary (see
test_resume.py for what that saves and how it resumes), and a second Ctrl-C stops it at once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from cli import TINY_DIGITS_RUN as TINY
from cli import offline_env, run_train_with, start_train
from normlab.callbacks.preemption import StopOnSignal, stopping_signal
from tiny_runs import tiny_checkpoint

INTERRUPT_ON_IMPORT = "import os, signal\nos.kill(os.getpid(), signal.SIGINT)\n"


def assert_one_line(result_stderr: str, where: str) -> None:
    lines = [line for line in result_stderr.splitlines() if line.strip()]
    assert lines == [f"normlab: interrupted (SIGINT) {where}: nothing was saved"], result_stderr


def test_ctrl_c_while_the_run_sets_up_ends_in_one_line(tmp_path):
    # A module of imports= is imported during set-up, after the config is checked.
    result = run_train_with(
        tmp_path,
        "interrupt_for_test",
        INTERRUPT_ON_IMPORT,
        f"hydra.run.dir={tmp_path / 'run'}",
        "experiment=densenet_digits",
        "imports=[interrupt_for_test]",
        timeout=300,
    )
    assert result.returncode == 130
    assert_one_line(result.stderr, "before training started")


def test_ctrl_c_while_the_entry_point_imports_ends_in_one_line(tmp_path):
    process = start_train(
        f"hydra.run.dir={tmp_path / 'run'}", "experiment=densenet_digits", env=offline_env()
    )
    # torch is imported after the handler is in place, and long before the imports end.
    maps = Path(f"/proc/{process.pid}/maps")
    deadline = time.monotonic() + 120
    while "libtorch" not in maps.read_text():
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 130
    # Usually still importing; on a fast machine it may have reached the set-up.
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("normlab: interrupted (SIGINT) "), output


class _Steps(pl.LightningModule):
    """A linear model that sends itself ``signum`` ``times`` times in training step ``at``."""

    def __init__(self, signum: int, at: int, times: int = 1) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.signum, self.at, self.times = signum, at, times

    def training_step(self, batch, batch_idx):
        if self.global_step == self.at:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)
        return self.layer(batch).square().mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(64, 4), batch_size=4)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer_with(callback: pl.Callback, tmp_path: Path) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=1,
        callbacks=[callback],
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.fixture
def sigint_restored():
    previous = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("name", ["SIGINT", "SIGUSR2"])
def test_the_signal_stops_training_after_the_current_step(tmp_path, name):
    signum = signal.Signals[name]
    previous = signal.getsignal(signum)
    try:
        trainer = trainer_with(StopOnSignal(name), tmp_path)
        with pytest.raises(SIGTERMException):
            trainer.fit(_Steps(signum, at=3))
    finally:
        signal.signal(signum, previous)
    assert trainer.global_step == 4  # step 3 (the fourth) completed, then the loop stopped
    assert stopping_signal(trainer) == signum


def test_ctrl_c_twice_stops_at_once(tmp_path, sigint_restored):
    # The second Ctrl-C goes to the handler installed before: Python's KeyboardInterrupt, which
    # Lightning ends the process with, at once. (A handler of an earlier run's StopOnSignal is
    # passed over.) That handler is what `python -m normlab.train` installs before training; set
    # here too, since an earlier test in this worker may have left another (Lightning ignores
    # SIGINT after a KeyboardInterrupt it handled).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    trainer_with(StopOnSignal("SIGINT"), tmp_path).fit(_Steps(signal.SIGINT, at=-1))
    trainer = trainer_with(StopOnSignal("SIGINT"), tmp_path)
    with pytest.raises(SystemExit) as stopped:
        trainer.fit(_Steps(signal.SIGINT, at=3, times=2))
    assert stopped.value.code == 1 and trainer.global_step == 3


def test_a_run_in_a_python_session_leaves_ctrl_c_as_it_found_it(tmp_path, sigint_restored):
    # A notebook's or a script's handler: after train() returns, its next Ctrl-C is theirs again,
    # not the finished run's StopOnSignal (which would only log "stopping after this batch").
    def notebook_handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, notebook_handler)
    tiny_checkpoint("classification", tmp_path / "run")
    assert signal.getsignal(signal.SIGINT) is notebook_handler


def test_a_run_stopped_by_sigterm_itself_is_reported_as_sigterm(tmp_path, sigint_restored):
    trainer = trainer_with(StopOnSignal("SIGINT"), tmp_path)
    with pytest.raises(SIGTERMException):
        trainer.fit(_Steps(signal.SIGTERM, at=2))
    assert trainer.global_step == 3 and stopping_signal(trainer) == signal.SIGTERM


def test_a_pending_stop_request_reaches_the_ranks_decision_in_validation_and_test(
    tmp_path, sigint_restored
):
    class Evaluated(_Steps):
        def validation_step(self, batch, batch_idx):
            if batch_idx == 1:
                os.kill(os.getpid(), signal.SIGINT)

        val_dataloader = test_dataloader = _Steps.train_dataloader
        test_step = validation_step

    stop = StopOnSignal("SIGINT")
    trainer = trainer_with(stop, tmp_path)
    with pytest.raises(SIGTERMException):
        trainer.validate(Evaluated(signal.SIGINT, at=-1))
    assert trainer.validate_loop.batch_progress.current.completed == 2  # batch 1 was finished
    with pytest.raises(SIGTERMException):
        trainer_with(stop, tmp_path).test(Evaluated(signal.SIGINT, at=-1))


SIGINT_AT_STEP_2 = """
import os, signal
import lightning.pytorch as pl

class At(pl.Callback):
    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == 1:
            os.kill(os.getpid(), signal.SIGINT)
"""


def test_ctrl_c_in_training_saves_the_step_and_exits_130(tmp_path):
    # Periodic checkpoints are off: last.ckpt comes from the stop.
    run_dir = tmp_path / "run"
    result = run_train_with(
        tmp_path,
        "interrupt_for_test",
        SIGINT_AT_STEP_2,
        f"hydra.run.dir={run_dir}",
        *TINY,
        "callbacks.last_checkpoint.every_n_train_steps=1000",
        "+callbacks.interrupt._target_=interrupt_for_test.At",
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 130, output[-3000:]  # as a shell reports Ctrl-C
    assert "Detected KeyboardInterrupt" not in output and "Traceback" not in output
    last = run_dir / "checkpoints" / "last.ckpt"
    assert (
        f"stopped by SIGINT in training: saved {last} at step 2; continue with "
        f"hydra.run.dir={run_dir} ckpt_path=last" in output
    )
    assert torch.load(last, weights_only=True)["global_step"] == 2


SIGINT_ON_RANK_0 = """
import os, signal
import lightning.pytorch as pl

class OnRank0(pl.Callback):
    def on_train_batch_start(self, trainer, *args):
        if trainer.global_rank == 0 and trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGINT)
"""


@pytest.mark.ddp
def test_ctrl_c_on_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    run_dir = tmp_path / "run"
    result = run_train_with(
        tmp_path,
        "interrupt_for_test",
        SIGINT_ON_RANK_0,
        f"hydra.run.dir={run_dir}",
        *TINY,
        "trainer=ddp_cpu",
        "trainer.limit_train_batches=6",
        "callbacks.last_checkpoint.every_n_train_steps=1000",
        "+callbacks.interrupt._target_=interrupt_for_test.OnRank0",
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 130, output[-3000:]
    assert output.count("stopped by SIGINT in training: saved") == 1  # rank 0 reports
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
