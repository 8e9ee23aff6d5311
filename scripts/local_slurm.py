#!/usr/bin/env python3
"""A one-node Slurm cluster on this machine, for trying and testing ``hydra/launcher=slurm``.

    python3 scripts/local_slurm.py up       # munged, slurmctld, slurmd; waits until the node is idle
    python3 scripts/local_slurm.py status
    python3 scripts/local_slurm.py down     # cancels its jobs, stops exactly the daemons it started

Everything (config, munge key, state, logs, the daemons' PIDs) lives in one directory that this
script owns: ``$NORMLAB_SLURM_DIR``, else ``.slurm/`` in the repository. Slurm's commands find
the cluster through ``SLURM_CONF=<dir>/slurm.conf``; ``up`` prints the line to export. It never
writes to ``/etc`` and refuses to start when ``sinfo`` already answers for some other cluster.
It installs nothing: ``make slurm-local`` installs Debian's ``slurm-wlm`` and ``munge`` first.
Runs as root (Slurm's daemons run as SlurmUser=root here); needs only the standard library.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DAEMONS = ("munged", "slurmctld", "slurmd")  # start order; stopped in reverse
CLIENTS = ("sinfo", "squeue", "scontrol", "scancel", "sbatch", "srun")
CLUSTER_NAME = "normlab-local"
# Finished jobs stay visible to squeue/scontrol this long: with no accounting database they are
# the only record of a job's final state.
MIN_JOB_AGE_S = 3600


class LocalSlurmError(RuntimeError):
    """A reason the local cluster cannot be started or stopped, printed as one line."""


def default_dir() -> Path:
    return Path(os.environ.get("NORMLAB_SLURM_DIR", REPO / ".slurm")).resolve()


class LocalSlurm:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.conf = directory / "slurm.conf"
        self.munge_socket = directory / "munge" / "munge.socket"
        self.pid_dir = directory / "pids"
        self.log_dir = directory / "log"

    # -- what is running -------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def recorded_pid(self, daemon: str) -> int | None:
        """The PID this script recorded for ``daemon`` if that process is still the daemon (a
        recycled PID of another program is not ours to stop)."""
        path = self.pid_dir / f"{daemon}.pid"
        try:
            pid = int(path.read_text())
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except (OSError, ValueError):
            return None
        return pid if Path(os.fsdecode(command)).name == daemon else None

    def running(self) -> dict[str, int]:
        return {d: pid for d in DAEMONS if (pid := self.recorded_pid(d)) is not None}

    def node_state(self) -> str | None:
        result = run_quiet(["sinfo", "--noheader", "--format=%T"], env=self.env(), timeout=15)
        return result.stdout.strip() if result and result.returncode == 0 else None

    # -- up --------------------------------------------------------------------------------

    def up(self, timeout_s: float = 60) -> None:
        missing = [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name) is None]
        if missing:
            raise LocalSlurmError(
                f"Slurm is not installed here ({', '.join(missing)} not found); "
                "`make slurm-local` installs Debian's slurm-wlm and munge (as root, with apt-get)"
            )
        if os.geteuid() != 0:
            raise LocalSlurmError("the local Slurm runs its daemons as root; run this as root")
        if self.running():
            if self.node_state() == "idle":
                print(f"local Slurm already up; export SLURM_CONF={self.conf}")
                return
            raise LocalSlurmError(
                f"a local Slurm from {self.dir} is half up ({self.running()}); run `down` first"
            )
        other = run_quiet(["sinfo", "--noheader", "--format=%P %T"], env=None, timeout=20)
        if other and other.returncode == 0:
            raise LocalSlurmError(
                "a Slurm cluster already answers here (sinfo: "
                f"{' '.join(other.stdout.split()) or 'no partitions'}); "
                "not starting a local one beside it"
            )
        self._write_files()
        try:
            self._start(
                "munged",
                [
                    "munged",
                    "--foreground",
                    "--force",
                    f"--socket={self.munge_socket}",
                    f"--key-file={self.dir / 'munge' / 'munge.key'}",
                    f"--pid-file={self.dir / 'munge' / 'munged.pid'}",
                    f"--seed-file={self.dir / 'munge' / 'munged.seed'}",
                    f"--log-file={self.log_dir / 'munged.log'}",
                ],
            )
            wait_for(self.munge_socket.exists, 15, "munged did not create its socket")
            self._start("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            self._start("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
            wait_for(lambda: self.node_state() == "idle", timeout_s, "the node did not become idle")
        except LocalSlurmError as error:
            self.down(quiet=True)
            raise LocalSlurmError(f"{error} (logs: {self.log_dir})") from None
        print(f"local Slurm up ({self.dir}); export SLURM_CONF={self.conf}")

    def _write_files(self) -> None:
        # A fresh cluster each time: no jobs or node state left from an earlier one.
        for sub in ("state", "pids", "munge"):
            shutil.rmtree(self.dir / sub, ignore_errors=True)
        for sub in ("state/ctld", "state/slurmd", "pids", "munge", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "munge").chmod(0o700)
        key = self.dir / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        host = socket.gethostname()
        memory_mb = int(meminfo_kb() / 1024 * 0.9)
        self.conf.write_text(
            f"""# Written by scripts/local_slurm.py: a one-node cluster on {host}.
ClusterName={CLUSTER_NAME}
SlurmctldHost={host}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire seconds before it may start again (120 by default).
AuthInfo=socket={self.munge_socket},cred_expire=10
# No cgroups here: processes are tracked through /proc and tasks are not confined.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# No accounting database: sacct has nothing to read; squeue/scontrol keep finished jobs.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge={MIN_JOB_AGE_S}
MpiDefault=none
# Start pending and requeued jobs within seconds (the defaults wait up to a minute).
SchedulerParameters=sched_interval=5,bf_interval=5
ReturnToService=2
StateSaveLocation={self.dir / "state" / "ctld"}
SlurmdSpoolDir={self.dir / "state" / "slurmd"}
SlurmctldPidFile={self.dir / "state" / "slurmctld.pid"}
SlurmdPidFile={self.dir / "state" / "slurmd.pid"}
SlurmctldLogFile={self.log_dir / "slurmctld.log"}
SlurmdLogFile={self.log_dir / "slurmd.log"}
NodeName={host} CPUs={os.cpu_count()} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _start(self, daemon: str, command: list[str]) -> None:
        log = (self.log_dir / f"{daemon}.out").open("ab")
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True
        )
        (self.pid_dir / f"{daemon}.pid").write_text(str(process.pid))
        time.sleep(0.5)
        if process.poll() is not None:
            raise LocalSlurmError(f"{daemon} exited at start with code {process.returncode}")

    # -- down ------------------------------------------------------------------------------

    def down(self, quiet: bool = False) -> None:
        running = self.running()
        if "slurmctld" in running:
            self._cancel_jobs()
        for daemon in reversed(DAEMONS):
            if (pid := running.get(daemon)) is not None:
                stop(pid)
            (self.pid_dir / f"{daemon}.pid").unlink(missing_ok=True)
        if not quiet:
            stopped = ", ".join(f"{d} ({p})" for d, p in running.items()) or "nothing was running"
            print(f"local Slurm down: stopped {stopped}")

    def _cancel_jobs(self) -> None:
        """Cancel the cluster's jobs so that no job step outlives slurmd."""
        listing = run_quiet(
            ["squeue", "--noheader", "--format=%A", "--states=PENDING,RUNNING,SUSPENDED"],
            env=self.env(),
            timeout=15,
        )
        jobs = listing.stdout.split() if listing and listing.returncode == 0 else []
        if not jobs:
            return
        run_quiet(["scancel", *jobs], env=self.env(), timeout=15)

        def none_left() -> bool:
            left = run_quiet(
                ["squeue", "--noheader", "--format=%A", "--states=RUNNING,COMPLETING"],
                env=self.env(),
                timeout=15,
            )
            return bool(left) and left.returncode == 0 and not left.stdout.split()

        # If some job step is slow to end, stopping slurmd below ends it.
        with contextlib.suppress(LocalSlurmError):
            wait_for(none_left, 60, "")

    # -- status ----------------------------------------------------------------------------

    def status(self) -> bool:
        running = self.running()
        state = self.node_state() if "slurmctld" in running else None
        daemons = ", ".join(f"{d} {p}" for d, p in running.items()) or "no daemons"
        print(f"local Slurm ({self.dir}): {daemons}; node {state or 'not answering'}")
        return state is not None


def run_quiet(
    command: list[str], env: dict[str, str] | None, timeout: float
) -> subprocess.CompletedProcess | None:
    """Run a Slurm client command; None when it cannot run or does not answer in time."""
    try:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


def wait_for(condition, timeout_s: float, failure: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise LocalSlurmError(failure)
        time.sleep(0.5)


def stop(pid: int, grace_s: float = 15) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        reap(pid)
        time.sleep(0.2)
    if Path(f"/proc/{pid}").exists():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    reap(pid)


def reap(pid: int) -> None:
    """Collect the exit status when the daemon is our own child (``up`` and ``down`` in one
    process), so that it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def meminfo_kb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    raise LocalSlurmError("cannot read MemTotal from /proc/meminfo")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument("--dir", type=Path, default=None, help="state dir (default: .slurm/)")
    args = parser.parse_args(argv)
    cluster = LocalSlurm((args.dir or default_dir()).resolve())
    try:
        if args.action == "up":
            cluster.up()
        elif args.action == "down":
            cluster.down()
        else:
            return 0 if cluster.status() else 1
    except LocalSlurmError as error:
        print(f"local Slurm: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
