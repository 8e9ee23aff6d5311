"""The local Slurm itself: up from nothing and down without a trace, no second cluster beside an
answering one, and a submission with no Slurm to answer stops with one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cluster_helpers import Cluster, local_slurm

from cli import run_train

pytestmark = pytest.mark.slurm

QUICK = ("experiment=densenet_digits", "model=densenet_bc_40", "data.image_size=16", "debug=fdr")


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


def processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in command:
                found.append(f"{proc.name}: {command}")
    return found


@pytest.fixture(scope="module")
def stopped_cluster(tmp_path_factory: pytest.TempPathFactory) -> tuple[Cluster, dict[str, int]]:
    """A local cluster brought up from nothing, checked, and brought down: its dir and the PIDs
    it had recorded."""
    cluster = Cluster(tmp_path_factory.mktemp("cycle"))
    up = local_slurm("up", cluster.directory)
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"export SLURM_CONF={cluster.conf}" in up.stdout
    pids = {path.stem: int(path.read_text()) for path in (cluster.directory / "pids").glob("*.pid")}
    assert sorted(pids) == ["munged", "slurmctld", "slurmd"]
    assert all(alive(pid) for pid in pids.values())
    assert cluster.command("sinfo", "--noheader", "--format=%T").split() == ["idle"]
    # A job runs: two tasks through srun, as the DDP jobs will.
    output = cluster.directory / "hello.out"
    cluster.command(
        "sbatch", "--wait", "-n", "2", f"--output={output}", "--wrap", "srun -n 2 echo task"
    )
    assert output.read_text().split() == ["task", "task"]
    down = local_slurm("down", cluster.directory)
    assert down.returncode == 0, down.stdout + down.stderr
    return cluster, pids


def test_local_slurm_comes_up_from_nothing_and_goes_down_leaving_no_daemon(stopped_cluster):
    cluster, pids = stopped_cluster
    assert not [daemon for daemon, pid in pids.items() if alive(pid)]
    # Nor any job step or other process of this cluster.
    assert processes_mentioning(str(cluster.directory)) == []
    status = local_slurm("status", cluster.directory)
    assert status.returncode == 1 and "no daemons" in status.stdout


def test_submitting_without_sbatch_is_one_line(tmp_path: Path):
    env = {**os.environ, "PATH": str(tmp_path), "WANDB_MODE": "offline"}
    result = run_train(
        "-m",
        *QUICK,
        "hydra/launcher=slurm",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        env=env,
        timeout=900,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "normlab: cannot submit to Slurm: sbatch, squeue, scontrol not found on PATH: "
        "hydra/launcher=slurm submits from a Slurm login node (on this machine: `make "
        "slurm-local`, then export the SLURM_CONF it prints)"
    ]


def test_submitting_with_the_controller_down_is_one_line(stopped_cluster, tmp_path: Path):
    cluster, _ = stopped_cluster
    result = run_train(
        "-m",
        *QUICK,
        "hydra/launcher=slurm",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        env=cluster.env(),
        timeout=900,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("normlab: cannot submit to Slurm: no Slurm controller answers")
    assert "DOWN" in lines[0]
    assert not (tmp_path / "sweep" / ".submitit").exists()


def test_up_refuses_to_start_beside_a_cluster_that_answers(cluster: Cluster, tmp_path: Path):
    # The session's cluster plays the system's: its SLURM_CONF is what sinfo reads by default.
    refused = local_slurm("up", tmp_path / "second", env=cluster.env())
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        "local Slurm: a Slurm cluster already answers here (sinfo: debug* idle); "
        "not starting a local one beside it"
    ]
    assert not (tmp_path / "second" / "slurm.conf").exists()
    assert cluster.command("sinfo", "--noheader", "--format=%T").split() == ["idle"]
