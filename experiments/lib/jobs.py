"""Running a study's training jobs: each job a ``python -m normlab.train`` process timed into its
own run dir, as many at once as the cores allow, finished jobs skipped (an interrupted study
resumes) and identical finished runs of other studies copied instead of trained again."""

from __future__ import annotations

import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

from normlab.callbacks.progress import duration, time_left
from normlab.utils.hydra_run import CONFIG_DIR
from normlab.utils.run_info import git_sha

REPO_ROOT = CONFIG_DIR.parent
# Written by run_study after a job exits 0: rerunning a study skips what is already done, so an
# interrupted study resumes where it stopped.
FINISHED = "study_job.json"
# Written by run_study when one call trained every job of the study: the study's own wall time,
# scheduling gaps included, which is what a user waiting on `make study-<name>` sees.
STUDY_TIMING = "study_timing.json"
# Written by run_evaluations: what a study measures of a finished run after training (a metric
# name → value), which runs.csv records beside the metrics the run logged.
STUDY_METRICS = "study_metrics.json"


@dataclass(frozen=True)
class StudyJob:
    """One training run of a study: ``python -m normlab.train experiment=... <overrides>``.

    ``processes``: CPU cores the job occupies (2 for a ``trainer=ddp_cpu`` run); the scheduler
    never runs more jobs at once than there are cores, and every process gets one thread.
    """

    name: str
    experiment: str
    overrides: tuple[str, ...]
    processes: int = 1


def study_root(study: str) -> Path:
    """Where a study's runs land: ``logs/studies/<study>``."""
    return REPO_ROOT / "logs" / "studies" / study


def machine_build() -> str:
    """This machine's cores, CPU model, GPU and torch build: recorded with every study job. The
    model, because VMs of the same size differ: norm_cost's ratios moved by a third between two
    of them."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    cores = f"{os.cpu_count()} CPU cores ({cpu_model()}, {platform.machine()})"
    return f"{cores}, {gpu}, torch {torch.__version__}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [
                line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")
            ]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or "CPU model unknown"


def machine_line() -> str:
    """:func:`machine_build` and today's date, for a result measured now."""
    return f"{machine_build()}, {datetime.now(timezone.utc):%Y-%m-%d}"


def job_finished(run_dir: Path) -> bool:
    return (run_dir / FINISHED).is_file()


def job_record(run_dir: Path) -> dict[str, Any]:
    """What :func:`run_study` recorded about a finished job (wall and CPU seconds, machine...)."""
    return json.loads((run_dir / FINISHED).read_text())


def _run_job(job: StudyJob, run_dir: Path, threads: int) -> float:
    command = [
        sys.executable,
        "-m",
        "normlab.train",
        f"experiment={job.experiment}",
        "logger=csv",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
        # A job cut off by an interrupted study continues from its last checkpoint (normlab
        # refuses a new run in a dir that holds another run's checkpoints).
        "resume=auto",
        *job.overrides,
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": str(threads)}
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with (run_dir / "stdout.log").open("w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=log)
        # wait4 reports this job's CPU time, its DDP worker processes included: unlike the
        # wall time, it does not grow when something else competes for the cores.
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(
            f"study job {job.name} failed (exit {process.returncode}): see {run_dir / 'stdout.log'}"
        )
    record = {
        "command": command[1:],
        "identity": job_identity(job),
        "seconds": seconds,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "threads": threads,
        "machine": machine_build(),
        "torch": torch.__version__,
        "finished": f"{datetime.now(timezone.utc):%Y-%m-%d}",
    }
    (run_dir / FINISHED).write_text(json.dumps(record, indent=1))
    return seconds


def job_identity(job: StudyJob) -> list[str]:
    """What decides a job's result besides the code: its experiment, overrides and processes."""
    return [job.experiment, *sorted(job.overrides), f"processes={job.processes}"]


def find_twin(job: StudyJob, studies: Path, exclude: Path, commit: str) -> Path | None:
    """A finished run of another study under ``studies/<study>/<run>`` that trained ``job``:
    the same experiment, overrides and process count, from the same clean ``commit``. Training
    is deterministic for a given seed on a given machine, so rerunning it would repeat it."""
    for marker in sorted(studies.glob(f"*/*/{FINISHED}")):
        run_dir = marker.parent
        if run_dir.parent == exclude or not (run_dir / "git_sha.txt").is_file():
            continue
        if (run_dir / "git_sha.txt").read_text().strip() != commit:
            continue
        if json.loads(marker.read_text()).get("identity") == job_identity(job):
            return run_dir
    return None


def reuse_twins(jobs: list[StudyJob], root: Path, studies: Path) -> list[StudyJob]:
    """Copy into ``root`` every job's twin from another study (:func:`find_twin`); returns the
    jobs that had none. Runs from uncommitted code are never reused: what trained them is gone."""
    commit = git_sha(REPO_ROOT)
    if commit == "unknown" or commit.endswith("-dirty"):
        print(
            f"Not reusing other studies' runs: {REPO_ROOT} has uncommitted changes to tracked "
            "files (git status), and this study's runs will record them",
            flush=True,
        )
        return jobs
    left = []
    for job in jobs:
        twin = find_twin(job, studies, root, commit)
        if twin is None:
            left.append(job)
            continue
        shutil.rmtree(root / job.name, ignore_errors=True)  # an interrupted attempt
        shutil.copytree(twin, root / job.name)
        record = job_record(root / job.name)
        record["reused_from"] = str(twin)
        (root / job.name / FINISHED).write_text(json.dumps(record, indent=1))
        print(f"{job.name}: reused {twin}", flush=True)
    return left


def run_study(
    jobs: list[StudyJob], root: Path, cores: int | None = None, reuse_from: Path | None = None
) -> None:
    """Run every job not finished yet under ``root/<job.name>``, as many at once as fit on
    ``cores`` (default: all). Small CPU models train faster as several 1-thread processes than as
    one process using every core. Jobs start in list order: one that needs more cores than are
    free waits for them, and no later job overtakes it (so a 2-process job is never starved by a
    stream of 1-process ones). Stops at the first failure, after the running jobs finish.
    ``reuse_from`` (e.g. ``logs/studies``): copy identical finished runs of other studies there
    instead of training them again (:func:`find_twin`)."""
    cores = cores or os.cpu_count() or 1
    pending = [job for job in jobs if not job_finished(root / job.name)]
    print(f"{len(jobs) - len(pending)} of {len(jobs)} runs already done under {root}", flush=True)
    untrained = len(pending)
    if reuse_from is not None and pending:
        pending = reuse_twins(pending, root, reuse_from)
    if not pending:
        return
    start = time.perf_counter()
    finished_jobs = itertools.count(1)  # next() is atomic: jobs finish on several threads

    def run(job: StudyJob) -> None:
        seconds = _run_job(job, root / job.name, threads=1)
        done, elapsed = next(finished_jobs), time.perf_counter() - start
        left = time_left(done, len(pending), elapsed)
        print(f"[{done}/{len(pending)}] {job.name} done in {duration(seconds)}, {left}", flush=True)

    free = cores
    running: dict[Future[None], int] = {}  # job → the cores it holds
    with ThreadPoolExecutor(max_workers=cores) as pool:
        for job in pending:
            need = min(job.processes, cores)
            while free < need:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    free += running.pop(future)
                    future.result()  # a failed job stops the study here
            free -= need
            running[pool.submit(run, job)] = need
        for future in running:
            future.result()
    timing = root / STUDY_TIMING
    if untrained == len(jobs):
        seconds = time.perf_counter() - start
        reused = len(jobs) - len(pending)
        timing.write_text(json.dumps({"seconds": seconds, "runs": len(jobs), "reused": reused}))
    else:  # a resumed study: its wall time is spread over several calls and not known
        timing.unlink(missing_ok=True)


def run_evaluations(
    jobs: list[StudyJob], root: Path, module: str, cores: int | None = None
) -> None:
    """``python -m <module> <run dir>`` for every finished job whose run dir has no
    ``study_metrics.json`` yet, as many at once as there are cores, each with one thread: the
    command measures what the study needs of the trained run and writes that file (so an
    interrupted study evaluates only what is missing)."""
    pending = [job for job in jobs if not (root / job.name / STUDY_METRICS).is_file()]
    if not pending:
        return
    print(f"evaluating {len(pending)} trained runs with {module}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def evaluate(job: StudyJob) -> None:
        run_dir = root / job.name
        with (run_dir / "study_evaluation.log").open("w") as log:
            exit_code = subprocess.call(
                [sys.executable, "-m", module, str(run_dir)],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=log,
            )
        if exit_code != 0 or not (run_dir / STUDY_METRICS).is_file():
            raise RuntimeError(
                f"evaluating {job.name} failed (exit {exit_code}): see "
                f"{run_dir / 'study_evaluation.log'}"
            )
        print(f"{job.name}: evaluated", flush=True)

    with ThreadPoolExecutor(max_workers=cores or os.cpu_count() or 1) as pool:
        for future in [pool.submit(evaluate, job) for job in pending]:
            future.result()


def study_seconds(root: Path, runs: int) -> float | None:
    """The wall time of the one call of :func:`run_study` that trained all ``runs`` jobs under
    ``root`` (None when the study was resumed or trained with another grid)."""
    timing = root / STUDY_TIMING
    if not timing.is_file():
        return None
    record = json.loads(timing.read_text())
    return record["seconds"] if record["runs"] == runs else None


def run_training(experiment: str, overrides: list[str], run_dir: Path) -> float:
    """``python -m normlab.train experiment=<experiment> logger=csv <overrides>`` into ``run_dir``;
    returns the wall time in seconds (everything included: data generation, validation, test)."""
    command = [
        sys.executable,
        "-m",
        "normlab.train",
        f"experiment={experiment}",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    start = time.perf_counter()
    env = {**os.environ, "WANDB_MODE": "offline"}
    subprocess.run(command, cwd=REPO_ROOT, check=True, env=env)
    return time.perf_counter() - start


def study_run_dir(task: str, experiment: str) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d_%H-%M-%S")
    return REPO_ROOT / "logs" / task / experiment / f"study_{stamp}"


def saved_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides a run was started with, exactly as Hydra received them.

    Hydra writes them to ``.hydra/overrides.yaml`` as a YAML list, quoting an entry as YAML
    needs (``'+x="it''s: y"'``); read as YAML, each comes back as the argument that was passed
    (no interpolation is resolved: ``${...}`` stays as written).
    """
    path = run_dir / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(path.read_text()) or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ValueError(f"{path} is not a list of overrides")
    return overrides


def slug(name: str) -> str:
    """A configuration's display name as a directory name: 'bn 2×2 (DDP)' → 'bn_2x2_DDP'."""
    kept = "".join(c if c.isalnum() else "_" for c in name.replace("×", "x"))
    return "_".join(part for part in kept.split("_") if part)


@dataclass(frozen=True)
class Configuration:
    """A named set of overrides a study compares; ``processes`` as in :class:`StudyJob`."""

    overrides: tuple[str, ...]
    processes: int = 1


def configuration_jobs(
    experiment: str, configurations: dict[str, Configuration], seeds: list[int]
) -> list[StudyJob]:
    """One job per configuration and seed, named ``<slug>_seed<seed>``."""
    return [
        StudyJob(
            f"{slug(name)}_seed{seed}",
            experiment,
            (*configuration.overrides, f"seed={seed}"),
            configuration.processes,
        )
        for seed in seeds
        for name, configuration in configurations.items()
    ]
