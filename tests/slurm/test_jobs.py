"""Training jobs through ``hydra/launcher=slurm`` on the local cluster: a grid as one job array,
DDP across Slurm tasks, pre-emption with requeue, and a crashed rank failing its job. Every state
asserted here is read from the scheduler (squeue/scontrol), not assumed."""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from cluster_helpers import Cluster
from omegaconf import OmegaConf

from cli import run_train, start_train
from normlab.collect.wandb_runs import read_offline_run
from test_ddp import HELPERS, SHORT, _assert_same_float64_weights

pytestmark = pytest.mark.slurm

# One CPU and no GPU per task; a hung job would run into the 20-minute limit.
LAUNCHER = (
    "hydra/launcher=slurm",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.timeout_min=20",
)
SMALL = (
    "experiment=densenet_digits",
    "model=densenet_bc_40",
    "data.image_size=16",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
)


def submitted(output: str) -> list[str]:
    """The job ids the launcher reported submitting (``<array>_<index>``)."""
    match = re.search(r"submitted ([0-9_, ]+)", output)
    assert match, output[-3000:]
    return [job.strip() for job in match.group(1).split(",")]


def job_dirs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def test_grid_runs_as_one_job_array_with_a_run_and_wandb_run_per_job(cluster: Cluster, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_train(
        "-m",
        *LAUNCHER,
        *SMALL,
        "norm=bn,gn",
        "data.batch_size=8,16",
        "debug=limit",
        "logger=wandb",
        f"hydra.sweep.dir={sweep}",
        env=cluster.env(),
        timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]

    jobs = submitted(output)
    array = jobs[0].split("_")[0]
    assert jobs == [f"{array}_{index}" for index in range(4)]  # one array of four tasks
    assert cluster.job_states(array) == dict.fromkeys(jobs, "COMPLETED")
    for number, job in enumerate(jobs):
        assert f"job {job} (#{number}): COMPLETED" in output
    # Job states came from squeue: no sacct warning at every poll.
    assert "sacct" not in output

    seen, groups = set(), set()
    for job in job_dirs(sweep):
        config = OmegaConf.load(job / "config_resolved.yaml")
        seen.add((config.norm.name, config.data.batch_size))
        run = read_offline_run(job / "wandb", wait=60)
        assert run.complete
        groups.add(run.group)
    assert seen == {("bn", 8), ("bn", 16), ("gn", 8), ("gn", 16)}
    assert groups == {f"densenet_digits-{sweep.name}"}


def test_ddp_over_two_slurm_tasks_equals_one_process_bn_on_the_doubled_batch(
    cluster: Cluster, tmp_path
):
    one = start_train(
        *SHORT,
        "norm=bn",
        "data.batch_size=16",
        f"hydra.run.dir={tmp_path / 'one'}",
        env=cluster.env(),
    )
    sweep = tmp_path / "two"
    two = run_train(
        "-m",
        *LAUNCHER,
        "hydra.launcher.tasks_per_node=2",
        "trainer=slurm_cpu",
        *SHORT,
        "norm=syncbn",
        "data.global_batch_size=16",
        f"hydra.sweep.dir={sweep}",
        env=cluster.env(),
        timeout=900,
    )
    one_output, _ = one.communicate(timeout=600)
    assert one.returncode == 0, one_output[-3000:]
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]

    [job] = submitted(two.stdout + two.stderr)
    assert cluster.job_states(job) == {job: "COMPLETED"}
    assert cluster.job_field(job, "NumTasks") == "2"
    # Slurm started both processes (one submitit log per task); Lightning started none.
    task_logs = sorted(p.name for p in (sweep / ".submitit" / job).glob("*_log.out"))
    assert task_logs == [f"{job}_0_log.out", f"{job}_1_log.out"]
    _assert_same_float64_weights(tmp_path / "one", sweep / "0")
    checkpoint = torch.load(sweep / "0" / "checkpoints" / "last.ckpt", map_location="cpu")
    assert checkpoint["global_step"] == 4


# test_resume's recipe (dropout and augmentation draw random numbers), long enough to be
# signalled in the middle: 3 epochs of 8 batches, a checkpoint after every step.
PREEMPTED = (
    *SMALL,
    "model.drop_rate=0.2",
    "data.batch_size=16",
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=8",
    "trainer.limit_val_batches=2",
    "test=false",
    "callbacks.last_checkpoint.every_n_train_steps=1",
)


def saved_step(checkpoint: Path) -> int:
    if not checkpoint.is_file():
        return -1
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return {**checkpoint["state_dict"], "global_step": torch.tensor(checkpoint["global_step"])}


def test_a_signalled_job_is_requeued_and_ends_as_if_never_interrupted(cluster: Cluster, tmp_path):
    reference = start_train(
        *PREEMPTED, "logger=csv", f"hydra.run.dir={tmp_path / 'reference'}", env=cluster.env()
    )
    sweep = tmp_path / "sweep"
    launcher = start_train(
        "-m", *LAUNCHER, *PREEMPTED, "logger=default", f"hydra.sweep.dir={sweep}", env=cluster.env()
    )
    # Submitit's pre-emption signal (what Slurm sends before the time limit), once step 3 is
    # saved and before the last of 24 steps.
    deadline = time.monotonic() + 600
    while saved_step(sweep / "0" / "checkpoints" / "last.ckpt") < 3:
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    [job] = [p.parent.name for p in (sweep / ".submitit").glob("*/*_submitted.pkl")]
    cluster.command("scancel", "--signal=USR2", job)
    signalled_at = saved_step(sweep / "0" / "checkpoints" / "last.ckpt")

    output, _ = launcher.communicate(timeout=900)
    reference_output, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, reference_output[-3000:]
    assert launcher.returncode == 0, output[-3000:]
    assert signalled_at < 24
    assert cluster.job_states(job) == {job: "COMPLETED"}
    assert cluster.job_field(job, "Restarts") == "1"
    log = "".join(p.read_text() for p in (sweep / ".submitit" / job).glob("*_log.*"))
    assert "SIGUSR2: stopping after this batch" in log
    assert "requeueing the job" in log

    assert_identical(final_state(sweep / "0"), final_state(tmp_path / "reference"))
    # Both attempts wrote to one wandb run.
    run_id = (sweep / "0" / "wandb_id.txt").read_text().strip()
    attempts = sorted((sweep / "0" / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(p.name.endswith(run_id) for p in attempts)
    assert read_offline_run(attempts[-1] / f"run-{run_id}.wandb", wait=60).complete


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_a_crash_on_one_rank_ends_the_job_failed_without_waiting_for_the_time_limit(
    cluster: Cluster, tmp_path
):
    (tmp_path / "ddp_test_helpers.py").write_text(HELPERS)
    sweep = tmp_path / "sweep"
    result = run_train(
        "-m",
        *LAUNCHER,
        "hydra.launcher.tasks_per_node=2",
        "trainer=slurm_cpu",
        *SHORT,
        "norm=syncbn",
        "trainer.max_steps=50",
        "imports=[ddp_test_helpers]",
        "+callbacks.crash={_target_:ddp_test_helpers.CrashAt,step:2,rank:1}",
        f"hydra.sweep.dir={sweep}",
        env=cluster.env(PYTHONPATH=str(tmp_path)),
        timeout=900,
    )
    output = result.stdout + result.stderr
    [job] = submitted(output)
    assert result.returncode == 1, output[-3000:]
    assert cluster.job_states(job) == {job: "FAILED"}
    assert f"normlab: 1 of 1 Slurm jobs did not complete: {job} (#0) FAILED" in result.stderr
    rank1_log = (sweep / ".submitit" / job / f"{job}_1_log.err").read_text()
    assert "deliberate failure on rank 1" in rank1_log
    # From rank 1's failure (submitit's record of it) to the job's end as Slurm saw it: srun
    # ended rank 0, which was waiting in a collective, instead of the 20-minute limit doing so.
    crashed = re.search(r"submitit ERROR \((\S+ \S+),\d+\) - Submitted job triggered", rank1_log)
    assert crashed, rank1_log[-2000:]
    ended = cluster.job_field(job, "EndTime").replace("T", " ")
    seconds = (
        datetime.fromisoformat(ended) - datetime.fromisoformat(crashed.group(1))
    ).total_seconds()
    assert 0 <= seconds < 60, seconds


def test_a_signalled_ddp_job_stops_both_ranks_at_one_step_and_finishes_after_requeue(
    cluster: Cluster, tmp_path
):
    sweep = tmp_path / "sweep"
    last = sweep / "0" / "checkpoints" / "last.ckpt"
    launcher = start_train(
        "-m",
        *LAUNCHER,
        "hydra.launcher.tasks_per_node=2",
        "trainer=slurm_cpu",
        *SHORT,
        "norm=syncbn",
        "data.global_batch_size=16",
        "trainer.max_steps=40",
        "callbacks.last_checkpoint.every_n_train_steps=1",
        f"hydra.sweep.dir={sweep}",
        env=cluster.env(),
    )
    deadline = time.monotonic() + 600
    while saved_step(last) < 3:
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    [job] = [p.parent.name for p in (sweep / ".submitit").glob("*/*_submitted.pkl")]
    cluster.command("scancel", "--signal=USR2", job)  # both tasks get it, each at its own moment

    output, _ = launcher.communicate(timeout=900)
    assert launcher.returncode == 0, output[-3000:]
    assert cluster.job_states(job) == {job: "COMPLETED"}
    assert cluster.job_field(job, "Restarts") == "1"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 40
    # The ranks agreed on one step to stop at: rank 0 saved there and requeued, rank 1 left.
    logs = {
        task: "".join(
            p.read_text() for p in (sweep / ".submitit" / job).glob(f"{job}_{task}_log.*")
        )
        for task in (0, 1)
    }
    assert "requeueing the job" in logs[0]
    assert "stopped at the step rank 0 chose" in logs[1]
