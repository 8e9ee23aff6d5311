"""Numerical faults and secrets: a NaN loss stops the run at its step with the last good
checkpoint kept (or is skipped and counted), debug=anomaly turns on autograd's anomaly mode, and
secrets from the environment reach no file of the run."""

from __future__ import annotations

import csv
import io
import json
import logging
import secrets
import subprocess
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from cli import offline_env, python_path_with, run_train
from normlab.utils.secrets import mask_secrets_in_logs

QUICK = (
    "experiment=densenet_digits",
    "model=densenet_bc_40",
    "data.image_size=16",
    "data.batch_size=16",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=8",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "test=false",
    "callbacks.last_checkpoint.every_n_train_steps=1",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
)
NAN_AT = """
import lightning.pytorch as pl

class NanAt(pl.Callback):
    '''Poison the images of the batch trained at (1-based) step `step`, once.'''

    def __init__(self, step):
        self.step = step
        self.done = False

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step + 1 == self.step and not self.done:
            batch[0].fill_(float("nan"))
            self.done = True
"""


def run_cli(
    tmp_path: Path, *overrides: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "fault_injection.py").write_text(NAN_AT)
    env = offline_env(OMP_NUM_THREADS="1", PYTHONPATH=python_path_with(tmp_path), **(env or {}))
    return run_train(f"hydra.run.dir={tmp_path / 'run'}", *QUICK, *overrides, env=env)


INJECT_AT_5 = ("+callbacks.nan._target_=fault_injection.NanAt", "+callbacks.nan.step=5")


def test_nan_loss_stops_the_run_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    result = run_cli(tmp_path, "logger=csv", *INJECT_AT_5)
    assert result.returncode == 3, result.stderr[-3000:]
    reported = [line for line in result.stderr.splitlines() if line.startswith("normlab:")]
    assert len(reported) == 1
    assert reported[0].startswith(
        "normlab: training stopped: non-finite loss at step 5 (epoch 0, batch 4): train/loss=nan"
    )
    assert "Traceback" not in result.stderr

    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4 < 5
    assert all(
        torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point()
    )


@pytest.mark.slow
def test_nan_loss_with_skip_leaves_the_batch_out_and_counts_it(tmp_path):
    result = run_cli(tmp_path, "logger=csv", *INJECT_AT_5, "task.on_nonfinite_loss=skip")
    assert result.returncode == 0, result.stderr[-3000:]
    with (tmp_path / "run" / "csv" / "metrics.csv").open() as handle:
        skips = [row["train/nonfinite_skips"] for row in csv.DictReader(handle)]
    # A running count: one skip, reported as 1 from then on.
    assert {float(s) for s in skips if s} == {1.0}
    output = result.stdout + result.stderr
    assert output.count("batch skipped") == 1 and "non-finite loss at step 5" in output
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    # Lightning still counts the step; the optimizer had no gradients to apply in it.
    assert last["global_step"] == 8
    assert all(
        torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point()
    )


def test_debug_anomaly_turns_on_autograd_anomaly_detection(compose_config):
    trainer = instantiate(compose_config("debug=anomaly").trainer)
    assert trainer._detect_anomaly
    assert not instantiate(compose_config().trainer)._detect_anomaly


def test_secrets_in_the_environment_reach_no_file_of_the_run(tmp_path):
    api_key, token = secrets.token_hex(20), secrets.token_urlsafe(16)
    result = run_cli(
        tmp_path,
        "logger=default",  # wandb and csv
        # A config value taken from the environment: the way a secret gets into a config.
        "+notes=${oc.env:MY_SERVICE_TOKEN}",
        env={"WANDB_API_KEY": api_key, "MY_SERVICE_TOKEN": token},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    assert "notes: '***'" in (run_dir / "config_resolved.yaml").read_text()
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    assert any(path.suffix == ".wandb" for path in files)
    leaks = [
        str(path.relative_to(run_dir))
        for path in files
        if api_key.encode() in path.read_bytes() or token.encode() in path.read_bytes()
    ]
    assert not leaks
    assert (
        api_key not in result.stdout + result.stderr and token not in result.stdout + result.stderr
    )


def test_a_secret_quoted_by_an_error_is_masked_in_the_log_and_the_job_outcome(tmp_path):
    token = secrets.token_urlsafe(16)
    env = offline_env(OMP_NUM_THREADS="1", MY_SERVICE_TOKEN=token)
    sweep_dir = tmp_path / "sweep"
    result = run_train(
        "-m",
        "data=cifar10",
        "data.root=/mnt/${oc.env:MY_SERVICE_TOKEN}",
        "logger=csv",
        "seed=1",
        f"hydra.sweep.dir={sweep_dir}",
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    log, outcome = (sweep_dir / "0" / name for name in ("train.log", "job_outcome.json"))
    masked = "data.root: /mnt/***/cifar-10-batches-py not found"
    assert masked in log.read_text() and masked in json.loads(outcome.read_text())["error"]
    assert masked in result.stderr
    leaks = [
        str(p) for p in sweep_dir.rglob("*") if p.is_file() and token.encode() in p.read_bytes()
    ]
    assert not leaks and token not in result.stdout + result.stderr


def test_the_log_masks_secrets_in_messages_and_tracebacks(monkeypatch):
    token = secrets.token_hex(12)
    monkeypatch.setenv("MY_SERVICE_TOKEN", token)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        mask_secrets_in_logs()
        try:
            raise ValueError(f"no such dir /mnt/{token}")
        except ValueError:
            logging.getLogger("normlab.train").exception("job failed at %s", token)
    finally:
        root.removeHandler(handler)
    text = stream.getvalue()
    assert "job failed at ***" in text and "ValueError: no such dir /mnt/***" in text
    assert token not in text
