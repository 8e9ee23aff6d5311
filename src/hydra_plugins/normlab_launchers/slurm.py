"""``hydra/launcher=slurm``: hydra-submitit-launcher's Slurm launcher, made to run on a real
scheduler and to survive pre-emption.

On the submitting side it
- stops with one line when no Slurm answers (``sbatch`` missing, controller down);
- reads job states from ``squeue`` when the cluster keeps no accounting (``sacct`` would fail at
  every poll, and submitit would then never learn that a job died without a result);
- waits until the scheduler reports every job finished, logs each job's final state, and exits
  non-zero naming the jobs that did not end COMPLETED;
- runs the job's tasks with ``srun --kill-on-bad-exit``: one crashed rank ends the whole job
  instead of leaving the others waiting in a collective until the time limit.

Inside each job it
- adds ``resume=auto`` (unless the command line chose ``resume`` or ``ckpt_path``), so a requeued
  job continues from its run dir's checkpoint, with the same wandb run;
- adds :class:`~normlab.callbacks.preemption.StopOnSignal`: submitit's pre-emption/time-limit
  signal (USR2) stops the run at the end of the current batch, as SIGTERM does, and writes
  ``last.ckpt`` with the last completed training step (before the Trainer runs, submitit's own
  handler requeues the job);
- after such a stop (exit 143, also after a plain SIGTERM), requeues the job through submitit,
  which counts time-outs against ``max_num_timeout``;
- turns a failed run into a failed Slurm job (Hydra would otherwise return the error as a value
  and the job would end COMPLETED).
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
    SlurmLauncher as SubmititSlurmLauncher,
)
from submitit.slurm.slurm import SlurmExecutor, SlurmInfoWatcher, SlurmJob

log = logging.getLogger(__name__)

# normlab.train's exit code after SIGTERM, once last.ckpt is written.
STOPPED_BY_SIGTERM = 128 + signal.SIGTERM
# States after which a job (array task) runs no more, unless requeued (then it is PENDING again).
RUNNING_STATES = frozenset(
    {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}
)
RESUME_KEYS = ("resume", "ckpt_path")
PREEMPTION_CALLBACK = "+callbacks.slurm_preemption={_target_:normlab.callbacks.preemption.StopOnSignal,signal_name:SIG%s}"


class SchedulerStates(SlurmInfoWatcher):
    """submitit's job-state watcher, reading ``squeue`` where the cluster has no accounting
    storage (``AccountingStorageType=accounting_storage/none``) and ``sacct`` elsewhere. squeue
    lists finished jobs for ``MinJobAge`` seconds (300 by default) after they end."""

    def __init__(self, delay_s: int = 60) -> None:
        super().__init__(delay_s=delay_s)
        self.accounting: bool | None = None

    def _make_command(self) -> list[str] | None:
        if self.accounting is None:
            self.accounting = _has_accounting()
            if not self.accounting:
                log.info("Slurm keeps no accounting here: job states come from squeue")
        command = super()._make_command()
        if command is None or self.accounting:
            return command
        jobs = sorted({job.split("_")[0] for job in self._registered - self._finished})
        return [
            "squeue",
            "--noheader",
            "--array",
            "--states=all",
            "--format=%i|%T",
            f"--jobs={','.join(jobs)}",
        ]

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        if self.accounting:
            return super().read_info(string)
        text = string.decode() if isinstance(string, bytes) else string
        states = {}
        for line in text.splitlines():
            job_id, _, state = line.strip().partition("|")
            if job_id and state:
                states[job_id] = {"JobID": job_id, "State": state}
        return states


class _WatchedJob(SlurmJob):
    watcher = SchedulerStates(delay_s=60)


class _Executor(SlurmExecutor):
    job_class = _WatchedJob


def _has_accounting() -> bool:
    result = subprocess.run(
        ["scontrol", "show", "config"], capture_output=True, text=True, timeout=60, check=False
    )
    return "accounting_storage/none" not in result.stdout


def slurm_problem() -> str | None:
    """Why jobs cannot be submitted from here, or None when a Slurm controller answers."""
    missing = [name for name in ("sbatch", "squeue", "scontrol") if shutil.which(name) is None]
    if missing:
        return (
            f"{', '.join(missing)} not found on PATH: hydra/launcher=slurm submits from a Slurm "
            "login node (on this machine: `make slurm-local`, then export the SLURM_CONF it prints)"
        )
    try:
        ping = subprocess.run(
            ["scontrol", "ping"], capture_output=True, text=True, timeout=60, check=False
        )
    except subprocess.TimeoutExpired:
        return "the Slurm controller did not answer `scontrol ping` within 60 s"
    answer = (ping.stdout + ping.stderr).strip().splitlines()
    if ping.returncode != 0 or not answer or not answer[0].rstrip().endswith("UP"):
        first = answer[0].strip() if answer else "no output"
        return f"no Slurm controller answers (scontrol ping: {first})"
    return None


def _with_slurm_overrides(overrides: Sequence[str]) -> list[str]:
    from submitit.core.job_environment import JobEnvironment

    keys = {item.split("=", 1)[0].lstrip("+~") for item in overrides}
    extra = [] if keys & set(RESUME_KEYS) else ["resume=auto"]
    return [*overrides, *extra, PREEMPTION_CALLBACK % JobEnvironment.USR_SIG]


class SlurmLauncher(SubmititSlurmLauncher):
    """The options of hydra-submitit-launcher's ``submitit_slurm`` (see
    ``conf/hydra/launcher/slurm.yaml``)."""

    poll_s: float = 5.0

    # -- submitting side ---------------------------------------------------------------------

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        problem = slurm_problem()
        if problem:
            print(f"normlab: cannot submit to Slurm: {problem}", file=sys.stderr)
            sys.exit(2)
        assert self.config is not None
        executor = self._executor()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("Slurm sweep dir: %s", sweep_dir)
        arguments = []
        for number, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("\t#%d : %s", number, " ".join(filter_overrides(overrides)))
            arguments.append(
                (list(overrides), "hydra.sweep.dir", number, f"job_id_for_{number}", self._state())
            )
        try:
            jobs = executor.map_array(self, *zip(*arguments, strict=True))
        except Exception as error:  # sbatch's refusal, as one line
            print(f"normlab: cannot submit to Slurm: {_one_line(error)}", file=sys.stderr)
            sys.exit(2)
        log.info("submitted %s", ", ".join(job.job_id for job in jobs))
        states = self._wait(jobs)
        failed = []
        for number, (job, state) in enumerate(
            zip(jobs, states, strict=True), start=initial_job_idx
        ):
            log.info("job %s (#%d): %s", job.job_id, number, state)
            if state != "COMPLETED":
                failed.append(f"{job.job_id} (#{number}) {state}, log {job.paths.stderr}")
        if failed:
            print(
                f"normlab: {len(failed)} of {len(jobs)} Slurm jobs did not complete: "
                + "; ".join(failed),
                file=sys.stderr,
            )
            sys.exit(1)
        return [job.results()[0] for job in jobs]

    def _executor(self) -> _Executor:
        params = {key: value for key, value in self.params.items() if value is not None}
        executor = _Executor(
            folder=params.pop("submitit_folder"), max_num_timeout=params.pop("max_num_timeout")
        )
        # The executor-independent names (timeout_min, tasks_per_node, mem_gb...) in sbatch's terms.
        options = executor._convert_parameters(params)
        executor.update_parameters(**options, srun_args=["--kill-on-bad-exit=1"])
        return executor

    @staticmethod
    def _state() -> Any:
        from hydra.core.singleton import Singleton

        return Singleton.get_state()

    def _wait(self, jobs: Sequence[SlurmJob]) -> list[str]:
        """Final scheduler states, polled every ``poll_s`` seconds (one squeue/sacct call)."""
        watcher = _WatchedJob.watcher
        while True:
            watcher.update()
            states = [watcher.get_state(job.job_id, mode="cache") for job in jobs]
            if all(state.split()[0] not in RUNNING_STATES | {"UNKNOWN"} for state in states):
                return [state.split()[0] for state in states]
            time.sleep(self.poll_s)

    # -- inside the job ----------------------------------------------------------------------

    def __call__(
        self,
        sweep_overrides: list[str],
        job_dir_key: str,
        job_num: int,
        job_id: str,
        singleton_state: dict[type, Any],
    ) -> JobReturn:
        from submitit.core.job_environment import JobEnvironment

        environment = JobEnvironment()
        # submitit's handler: checkpoint this call (the same arguments) and requeue the job.
        requeue = signal.getsignal(environment._usr_sig())
        try:
            result = super().__call__(
                _with_slurm_overrides(sweep_overrides),
                job_dir_key,
                job_num,
                job_id,
                singleton_state,
            )
        except SystemExit as stop:
            if stop.code != STOPPED_BY_SIGTERM:
                raise
            if environment.global_rank != 0:
                log.warning("stopped at the step rank 0 chose: rank 0 requeues the job")
                sys.exit(0)  # a non-zero exit would end the job (srun --kill-on-bad-exit) first
            log.warning("stopped with last.ckpt written: requeueing the job")
            try:
                requeue(environment._usr_sig(), None)
            except subprocess.CalledProcessError as error:
                # Slurm requeues by itself after `scontrol requeue` or pre-emption in
                # requeue mode; asking again is refused.
                log.warning("not requeued from inside the job (%s)", _one_line(error))
            raise
        if result.status == JobStatus.FAILED:
            # Raise the run's error: submitit records it, the task exits non-zero, and the job
            # ends FAILED instead of COMPLETED.
            result.return_value  # noqa: B018 (raises the job's exception)
        return result


def _one_line(error: BaseException) -> str:
    text = getattr(error, "stderr", None) or str(error)
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return " ".join(str(text).split())
