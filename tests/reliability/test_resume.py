"""Kill a training run with SIGKILL at step k, resume it with ckpt_path=last, and it ends with
the weights of a run that was never interrupted, bit for bit; SIGTERM saves before exiting."""

from __future__ import annotations

import csv
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from cli import offline_env, python_path_with, run_train, start_train
from normlab.collect.wandb_runs import read_offline_run
from normlab.errors import ConfigError
from normlab.train import train

ENV = offline_env(OMP_NUM_THREADS="1")
# 6 batches × 2 epochs of the small DenseNet with dropout (the model's RNG) and augmentation (the
# data's), a checkpoint after every optimizer step.
DIGITS = (
    "experiment=densenet_digits",
    "model=densenet_bc_40",
    "model.drop_rate=0.2",
    "data.image_size=16",
    "data.batch_size=16",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=2",
    "test=false",
    "trainer.log_every_n_steps=1",
    "callbacks.last_checkpoint.every_n_train_steps=1",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
)
PIX2PIX = (
    "experiment=pix2pix_digits",
    "data.num_train=40",
    "data.num_val=8",
    "data.num_test=8",
    "data.batch_size=8",
    "data.image_size=32",
    "data.load_size=36",
    "data.crop_size=32",
    "model.generator.num_downs=5",
    "model.generator.ngf=8",
    "model.discriminator.ndf=8",
    "task.n_epochs=1",
    "task.n_epochs_decay=1",
    "trainer.max_epochs=2",
    "test=false",
    "callbacks.last_checkpoint.every_n_train_steps=1",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
)


# The digits run with a weight EMA whose every part carries state across the kill: an update
# every 2 steps from step 2 (the counter and the last update's step), warm-up decays, and the
# averaged model's statistics recomputed from training batches before each validation.
DIGITS_EMA = (
    *DIGITS,
    "callbacks=ema",
    "ema.update_every_n_steps=2",
    "ema.start_step=1",
    "ema.norm_buffers=recompute",
    "ema.recompute_images=32",
)


def start(run_dir: Path, *overrides: str) -> subprocess.Popen[str]:
    return start_train(f"hydra.run.dir={run_dir}", *overrides, env=ENV)


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return output


def saved_step(checkpoint: Path) -> int:
    """The global step of ``checkpoint``, or -1 while there is none (writes are atomic, so a
    checkpoint that exists is complete)."""
    if not checkpoint.is_file():
        return -1
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]


def kill_at_step(process: subprocess.Popen, checkpoint: Path, step: int) -> int:
    """SIGKILL ``process`` as soon as it has checkpointed ``step``; return the step it had."""
    while (reached := saved_step(checkpoint)) < step:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return reached


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return {**checkpoint["state_dict"], "global_step": torch.tensor(checkpoint["global_step"])}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def uninterrupted_state(run_dir: Path, recipe: tuple[str, ...]) -> dict[str, torch.Tensor]:
    finish(start(run_dir, *recipe, "logger=csv"))
    return final_state(run_dir)


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "csv" / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def uninterrupted_digits_dir(tmp_path_factory) -> Path:
    """The digits run that is never interrupted, run once."""
    run_dir = tmp_path_factory.mktemp("digits")
    finish(start(run_dir, *DIGITS, "logger=csv"))
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted_digits(uninterrupted_digits_dir) -> dict[str, torch.Tensor]:
    """Final weights of the digits run that is never interrupted."""
    return final_state(uninterrupted_digits_dir)


@pytest.fixture(scope="module")
def uninterrupted_pix2pix(tmp_path_factory) -> dict[str, torch.Tensor]:
    return uninterrupted_state(tmp_path_factory.mktemp("pix2pix"), PIX2PIX)


def kill_and_resume(
    run_dir: Path, recipe: tuple[str, ...], step: int, logger: str
) -> tuple[int, str]:
    """Kill a run once it has checkpointed ``step`` and resume it; the step it had reached and
    the output of the resumed process."""
    last = run_dir / "checkpoints" / "last.ckpt"
    reached = kill_at_step(start(run_dir, *recipe, f"logger={logger}"), last, step)
    return reached, finish(start(run_dir, *recipe, f"logger={logger}", "ckpt_path=last"))


def test_killed_mid_epoch_and_resumed_ends_bit_identical_and_continues_the_wandb_run(
    tmp_path, uninterrupted_digits, uninterrupted_digits_dir
):
    reached, output = kill_and_resume(tmp_path, DIGITS, 3, logger="default")
    assert 3 <= reached < 12  # the kill came before the end of training
    # Lightning sees the sampler's state: no false "dataloader is not resumable" warning.
    assert "not resumable" not in output
    assert re.search(r"resumed in epoch 0 after its batch [3-5]:", output), output[-3000:]
    assert_identical(final_state(tmp_path), uninterrupted_digits)
    # The CSV log is continued, not restarted: the rows of the killed part are kept, none is
    # doubled, and every logged value equals the uninterrupted run's.
    assert csv_rows(tmp_path) == csv_rows(uninterrupted_digits_dir)

    # Both processes wrote to the same wandb run (its id kept in the run dir and checkpoint).
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    offline_runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(p.name.endswith(run_id) for p in offline_runs)
    resumed = read_offline_run(offline_runs[-1] / f"run-{run_id}.wandb", wait=60)
    assert resumed.complete and "train/loss" in resumed.history_keys
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["normlab"]["wandb_id"] == run_id


@pytest.mark.slow
@pytest.mark.parametrize("step", [1, 6, 8, 11])
def test_killed_at_other_steps_ends_bit_identical(tmp_path, uninterrupted_digits, step):
    # 6 is the epoch boundary (the last batch of epoch 0), 11 the last step before the end.
    kill_and_resume(tmp_path, DIGITS, step, logger="csv")
    assert_identical(final_state(tmp_path), uninterrupted_digits)


@pytest.mark.slow
@pytest.mark.parametrize("step", [3, 13])
def test_pix2pix_with_two_optimizers_resumes_bit_identical(tmp_path, uninterrupted_pix2pix, step):
    # 5 batches per epoch, two optimizer steps (D, then G) per batch: 20 steps in all; 13 is
    # in the middle of the second epoch, after the learning rate started to decay.
    kill_and_resume(tmp_path, PIX2PIX, step, logger="csv")
    assert_identical(final_state(tmp_path), uninterrupted_pix2pix)


def weight_ema_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """The raw and the averaged model of ``last.ckpt`` and the averaging's counters."""
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return {
        **{f"raw/{k}": v for k, v in checkpoint["current_model_state"].items()},
        **{f"ema/{k}": v for k, v in checkpoint["state_dict"].items()},
        "n_averaged": checkpoint["averaging_state"]["n_averaged"],
        "latest_update_step": torch.tensor(
            checkpoint["callbacks"]["WeightEMA"]["latest_update_step"]
        ),
        "global_step": torch.tensor(checkpoint["global_step"]),
    }


@pytest.fixture(scope="module")
def uninterrupted_digits_ema(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("digits_ema")
    finish(start(run_dir, *DIGITS_EMA, "logger=csv"))
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("step", [3, 8])
def test_killed_with_a_weight_ema_resumes_both_models_and_its_counter_bit_identical(
    tmp_path, uninterrupted_digits_ema, step
):
    # 3: before any validation; 8: after the first, whose best-of the averaged copy keeps.
    reached, _ = kill_and_resume(tmp_path, DIGITS_EMA, step, logger="csv")
    assert step <= reached < 12
    expected = weight_ema_state(uninterrupted_digits_ema)
    assert int(expected["n_averaged"]) == 6 and int(expected["latest_update_step"]) == 12
    assert_identical(weight_ema_state(tmp_path), expected)
    # val/acc_ema and val/acc_best_ema included: the averaged copy's metric states resume too.
    rows = csv_rows(uninterrupted_digits_ema)
    assert any(row.get("val/acc_best_ema") for row in rows)
    assert csv_rows(tmp_path) == rows


def test_ckpt_path_last_without_a_checkpoint_is_an_error_not_a_fresh_start(compose_config):
    cfg = compose_config(*DIGITS, "logger=csv", "ckpt_path=last")
    with pytest.raises(ConfigError, match=r"ckpt_path=last: there is no .*last\.ckpt"):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


SIGTERM_AT = """
import os, signal
import lightning.pytorch as pl

class SigtermAt(pl.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)  # what SLURM does to a pre-empted job
"""


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_non_zero(tmp_path):
    (tmp_path / "preempt_for_test.py").write_text(SIGTERM_AT)
    recipe = [*DIGITS, "logger=csv", "callbacks.last_checkpoint.every_n_train_steps=1000"]
    recipe.remove("callbacks.last_checkpoint.every_n_train_steps=1")
    recipe += [
        "+callbacks.preempt._target_=preempt_for_test.SigtermAt",
        "+callbacks.preempt.step=4",
    ]
    env = {**ENV, "PYTHONPATH": python_path_with(tmp_path)}
    result = run_train(f"hydra.run.dir={tmp_path / 'run'}", *recipe, env=env, timeout=300)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert "stopped by SIGTERM" in result.stdout + result.stderr
    # The periodic checkpoint never fired (every 1000 steps): this one was written on SIGTERM.
    assert saved_step(tmp_path / "run" / "checkpoints" / "last.ckpt") == 4


def logged_step(run_dir: Path) -> int:
    """The highest step in the run's metrics.csv (every row is on disk as soon as it is logged)."""
    try:
        return max((int(row["step"]) for row in csv_rows(run_dir)), default=-1)
    except (FileNotFoundError, ValueError, KeyError):  # not created yet, or a row half-written
        return -1


# 60 optimizer steps over 25-batch epochs, so the run ends in the middle of its third epoch;
# last.ckpt every 7 steps (and after each validation, and at the end).
SIXTY_STEPS = (
    *(o for o in DIGITS if not o.startswith(("trainer.max_epochs", "trainer.limit_train", "call"))),
    "trainer.max_epochs=null",
    "trainer.max_steps=60",
    "trainer.limit_train_batches=25",
    "callbacks.last_checkpoint.every_n_train_steps=7",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "logger=csv",
)


@pytest.mark.slow
def test_sixty_step_run_killed_at_a_random_step_ends_like_the_uninterrupted_one(tmp_path):
    uninterrupted = tmp_path / "uninterrupted"
    finish(start(uninterrupted, *SIXTY_STEPS))
    expected = final_state(uninterrupted)
    assert int(expected["global_step"]) == 60  # the final weights are in last.ckpt
    assert [p.name for p in (uninterrupted / "checkpoints").glob("last*")] == ["last.ckpt"]

    kill_step = random.randint(2, 58)
    killed = tmp_path / "killed"
    process = start(killed, *SIXTY_STEPS)
    while logged_step(killed) < kill_step:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finish(start(killed, *SIXTY_STEPS, "resume=auto"))
    print(f"killed at logged step {kill_step}")  # shown when the test fails
    assert_identical(final_state(killed), expected)
    assert csv_rows(killed) == csv_rows(uninterrupted), f"killed at step {kill_step}"


STOP_IN = """
import os, signal
import lightning.pytorch as pl

class SignalIn(pl.Callback):
    '''Send `name` to this process in the first batch of `phase` (train: the batch that makes
    step `step`; validation, sanity: in epoch `epoch`); not in a resumed run (the same command
    with ckpt_path=last).'''

    def __init__(self, name, phase, step=0, epoch=0):
        self.signum = signal.Signals[name]
        self.phase, self.step, self.epoch = phase, step, epoch
        self.sent = False

    def _send(self, trainer):
        if not self.sent and not trainer.ckpt_path:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer, *args):
        if self.phase == "train" and trainer.global_step + 1 == self.step:
            self._send(trainer)

    def on_validation_batch_start(self, trainer, *args):
        wanted = self.phase == ("sanity" if trainer.sanity_checking else "validation")
        if wanted and trainer.current_epoch == self.epoch:
            self._send(trainer)
"""


def run_stopped(
    run_dir: Path, name: str, phase: str, *more: str, **where: int
) -> subprocess.CompletedProcess:
    """The digits run without periodic checkpoints, sent signal ``name`` in ``phase`` (unless
    ``more`` makes it a resumed run)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir.parent / "stop_for_test.py").write_text(STOP_IN)
    recipe = [o for o in DIGITS if not o.startswith("callbacks.last_checkpoint")]
    injected = "".join(f",{key}:{value}" for key, value in where.items())
    return run_train(
        f"hydra.run.dir={run_dir}",
        *recipe,
        "logger=csv",
        "callbacks.last_checkpoint.every_n_train_steps=1000",
        f"+callbacks.stop={{_target_:stop_for_test.SignalIn,name:{name},phase:{phase}{injected}}}",
        *more,
        env={**ENV, "PYTHONPATH": python_path_with(run_dir.parent)},
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "phase", "where", "step"),
    [
        # Ctrl-C in the middle of epoch 0: the step it was in is finished and saved.
        pytest.param("SIGINT", "train", {"step": 4}, 4, id="sigint-training"),
        # In the validation at the end of epoch 0 (after step 6) and of the last epoch (12).
        pytest.param("SIGTERM", "validation", {"epoch": 0}, 6, id="sigterm-validation"),
        pytest.param("SIGINT", "validation", {"epoch": 1}, 12, id="sigint-last-validation"),
    ],
)
def test_a_stop_in_training_or_validation_saves_the_last_step_and_resumes_exactly(
    tmp_path, uninterrupted_digits, uninterrupted_digits_dir, name, phase, where, step
):
    run_dir = tmp_path / "run"
    stopped = run_stopped(run_dir, name, phase, **where)
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode == 128 + signal.Signals[name], output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    expected = f"stopped by {name} in {'training' if phase == 'train' else phase}: saved "
    assert expected in output, output[-3000:]
    assert f"at step {step}; continue with hydra.run.dir={run_dir} ckpt_path=last" in output
    # Periodic checkpoints are off: this one was written by the stop, at the last finished step.
    assert saved_step(run_dir / "checkpoints" / "last.ckpt") == step

    # The same command continues (a resumed run is the run it started as).
    resumed = run_stopped(run_dir, name, phase, "ckpt_path=last", **where)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_identical(final_state(run_dir), uninterrupted_digits)
    # The interrupted validation was run again: every value the uninterrupted run logged
    # (validation metrics, the epoch's train/acc) is there once, equal.
    assert csv_rows(run_dir) == csv_rows(uninterrupted_digits_dir), resumed.stderr[-3000:]


# The digits run validating twice an epoch, after steps 3 and 6 of its 6.
MID_EPOCH_VALIDATION = (*DIGITS, "+trainer.val_check_interval=3")


@pytest.mark.slow
def test_killed_in_a_mid_epoch_validation_and_resumed_ends_as_the_run_left_alone(tmp_path):
    # SIGKILL in the validation after step 3: step 3 is saved after its validation, so the
    # resumed run goes back to step 2, runs step 3 and its validation again, logs each value
    # once and ends bit-identical. (Saved before it, Lightning would resume past it.)
    expected_dir = tmp_path / "uninterrupted"
    expected = uninterrupted_state(expected_dir, MID_EPOCH_VALIDATION)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (tmp_path / "stop_for_test.py").write_text(STOP_IN)
    env = {**ENV, "PYTHONPATH": python_path_with(tmp_path)}
    command = (
        f"hydra.run.dir={run_dir}",
        *MID_EPOCH_VALIDATION,
        "logger=csv",
        "+callbacks.stop={_target_:stop_for_test.SignalIn,name:SIGKILL,phase:validation}",
    )
    killed = run_train(*command, env=env, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert saved_step(run_dir / "checkpoints" / "last.ckpt") == 2
    resumed = run_train(*command, "ckpt_path=last", env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_identical(final_state(run_dir), expected)
    assert csv_rows(run_dir) == csv_rows(expected_dir)


def test_a_stop_in_the_sanity_check_saves_nothing_and_says_so(tmp_path):
    run_dir = tmp_path / "run"
    stopped = run_stopped(run_dir, "SIGTERM", "sanity")
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert (
        "stopped by SIGTERM in the sanity check, before the first training step: nothing to"
        in output
    )
    assert "ckpt_path=last" not in output  # no hint that would fail
    assert not list((run_dir / "checkpoints").glob("*.ckpt"))


# The digits recipe compiled (compile=true), on the smallest DenseNet-BC (one layer per block):
# every process compiles again, and a small network keeps that to seconds.
COMPILED_DIGITS = (*DIGITS, "model.depth=10", "compile=true")


@pytest.mark.slow
def test_a_compiled_run_killed_mid_epoch_and_resumed_ends_bit_identical(tmp_path):
    expected = uninterrupted_state(tmp_path / "uninterrupted", COMPILED_DIGITS)
    reached, output = kill_and_resume(tmp_path / "killed", COMPILED_DIGITS, 3, logger="csv")
    assert 3 <= reached < 12
    assert re.search(r"resumed in epoch 0 after its batch [3-5]:", output), output[-3000:]
    assert_identical(final_state(tmp_path / "killed"), expected)
