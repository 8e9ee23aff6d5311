"""The studies' side of experiments/: run training jobs timed (resuming what an interrupted study
had finished), read their metrics back, and tabulate and plot them."""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

from normlab.callbacks.progress import duration, time_left
from normlab.utils.hydra_run import CONFIG_DIR
from normlab.utils.run_info import git_sha

REPO_ROOT = CONFIG_DIR.parent


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


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    """The rows of the run's CSV log (one per logging step; empty cells where nothing was logged)."""
    with (run_dir / "csv" / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def column(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    """``(epoch, value)`` for every row that logged ``key``."""
    return [(int(r["epoch"]), float(r[key])) for r in rows if r.get(key)]


def machine_line() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{os.cpu_count()} CPU cores ({platform.machine()}), {gpu}, torch {torch.__version__}, "
        f"{datetime.now(timezone.utc):%Y-%m-%d}"
    )


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


def job_finished(run_dir: Path) -> bool:
    return (run_dir / _FINISHED).is_file()


def job_minutes(run_dir: Path) -> float:
    """Wall time of a finished study job (process start to exit, everything included)."""
    return json.loads((run_dir / _FINISHED).read_text())["seconds"] / 60


def job_reused(run_dir: Path) -> bool:
    """Whether a finished study job was copied from another study's identical run."""
    return "reused_from" in json.loads((run_dir / _FINISHED).read_text())


def job_cpu_minutes(run_dir: Path) -> float | None:
    """CPU time of a finished study job (None for jobs recorded before it was measured)."""
    seconds = json.loads((run_dir / _FINISHED).read_text()).get("cpu_seconds")
    return None if seconds is None else seconds / 60


# Written by run_study after a job exits 0: rerunning a study skips what is already done, so an
# interrupted study resumes where it stopped.
_FINISHED = "study_job.json"
# Written by run_study when one call trained every job of the study: the study's own wall time,
# scheduling gaps included, which is what a user waiting on `make study-<name>` sees.
_STUDY_TIMING = "study_timing.json"


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
    }
    (run_dir / _FINISHED).write_text(json.dumps(record, indent=1))
    return seconds


def job_identity(job: StudyJob) -> list[str]:
    """What decides a job's result besides the code: its experiment, overrides and processes."""
    return [job.experiment, *sorted(job.overrides), f"processes={job.processes}"]


def find_twin(job: StudyJob, studies: Path, exclude: Path, commit: str) -> Path | None:
    """A finished run of another study under ``studies/<study>/<run>`` that trained ``job``:
    the same experiment, overrides and process count, from the same clean ``commit``. Training
    is deterministic for a given seed on a given machine, so rerunning it would repeat it."""
    for marker in sorted(studies.glob(f"*/*/{_FINISHED}")):
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
        record = json.loads((root / job.name / _FINISHED).read_text())
        record["reused_from"] = str(twin)
        (root / job.name / _FINISHED).write_text(json.dumps(record, indent=1))
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
    timing = root / _STUDY_TIMING
    if untrained == len(jobs):
        seconds = time.perf_counter() - start
        reused = len(jobs) - len(pending)
        timing.write_text(json.dumps({"seconds": seconds, "runs": len(jobs), "reused": reused}))
    else:  # a resumed study: its wall time is spread over several calls and not known
        timing.unlink(missing_ok=True)


def final_value(run_dir: Path, key: str) -> float:
    """The last value a run logged for ``key`` (e.g. ``test/acc``)."""
    values = column(read_metrics(run_dir), key)
    if not values:
        raise KeyError(f"{run_dir}: no {key!r} in csv/metrics.csv")
    return values[-1][1]


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def verdict(holds: bool) -> str:
    return "**agrees**" if holds else "**disagrees**"


def plot_configurations(values: dict[str, list[float]], ylabel: str, path: Path) -> None:
    """One bar per configuration (the mean) with every seed's value as a dot on it."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(1.2 + 1.3 * len(values), 3.6), dpi=120)
    axes = figure.add_subplot()
    for index, points in enumerate(values.values()):
        axes.bar(index, mean_and_spread(points)[0], color=f"C{index}", alpha=0.6)
        axes.scatter([index] * len(points), points, color="black", s=12, zorder=3)
    axes.set_xticks(range(len(values)), list(values), fontsize=8)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path)


def plot_curves(curves: dict[str, list[list[tuple[int, float]]]], ylabel: str, path: Path) -> None:
    """Per-epoch validation curves, the mean over seeds of each configuration."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.6), dpi=120)
    axes = figure.add_subplot()
    for name, runs in curves.items():
        length = min(len(run) for run in runs)
        means = [sum(run[i][1] for run in runs) / len(runs) for i in range(length)]
        axes.plot([runs[0][i][0] + 1 for i in range(length)], means, marker="o", label=name)
    axes.set_xlabel("epoch")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


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


def collect(root: Path, names: list[str], seeds: list[int], key: str) -> dict[str, list[float]]:
    """``key``'s final value for every configuration, one entry per seed."""
    return {
        name: [final_value(root / f"{slug(name)}_seed{seed}", key) for seed in seeds]
        for name in names
    }


def collect_curves(
    root: Path, names: list[str], seeds: list[int], key: str
) -> dict[str, list[list[tuple[int, float]]]]:
    return {
        name: [column(read_metrics(root / f"{slug(name)}_seed{seed}"), key) for seed in seeds]
        for name in names
    }


def results_table(values: dict[str, list[float]], seeds: list[int], digits: int = 1) -> list[str]:
    """Markdown rows: configuration | one column per seed | mean ± std."""
    header = "| configuration | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |"
    rows = [header, "|---|" + "---:|" * (len(seeds) + 1)]
    for name, points in values.items():
        mean, std = mean_and_spread(points)
        cells = " | ".join(f"{p:.{digits}f}" for p in points)
        rows.append(f"| {name} | {cells} | **{mean:.{digits}f}** ± {std:.{digits}f} |")
    return rows


def study_minutes(root: Path, jobs: list[StudyJob]) -> float:
    return sum(job_minutes(root / job.name) for job in jobs)


def study_time_line(root: Path, jobs: list[StudyJob]) -> str:
    """How long the study's runs took: wall and CPU run-minutes (CPU time over 2 cores is what
    the study needs on an otherwise idle 2-core machine)."""
    wall = study_minutes(root, jobs)
    cpu = [job_cpu_minutes(root / job.name) for job in jobs]
    line = f"{len(jobs)} runs, {wall:.0f} run-minutes of wall time"
    if None not in cpu:
        line += f", {sum(cpu):.0f} CPU-minutes (≈ {sum(cpu) / 2:.0f} min on 2 idle cores)"
    reused = [job for job in jobs if job_reused(root / job.name)]
    if reused:
        minutes = study_minutes(root, reused)
        line += (
            f"; {len(reused)} of the runs ({minutes:.0f} run-minutes) are copies of identical "
            "runs of another study"
        )
    timing = root / _STUDY_TIMING
    if timing.is_file() and json.loads(timing.read_text())["runs"] == len(jobs):
        minutes = json.loads(timing.read_text())["seconds"] / 60
        line += f"; the whole study took {minutes:.0f} min of wall time in one go"
        if reused:
            line += " (training the others)"
    return line


def study_code_line(root: Path, jobs: list[StudyJob]) -> str:
    """Which commit the study's runs trained from (each run dir's git_sha.txt), so a table made
    from runs of different or uncommitted code says so."""
    runs_per_revision: dict[str, int] = {}
    for job in jobs:
        sha_file = root / job.name / "git_sha.txt"
        sha = sha_file.read_text().strip() if sha_file.is_file() else "unknown"
        runs_per_revision[sha] = runs_per_revision.get(sha, 0) + 1

    def describe(sha: str) -> str:
        if sha == "unknown":
            return "an unknown commit"
        commit, dirty, _ = sha.partition("-dirty")
        return f"commit {commit[:7]}" + (" with uncommitted changes" if dirty else "")

    if len(runs_per_revision) == 1:
        return f"Code: {describe(next(iter(runs_per_revision)))}"
    return "Code: " + ", ".join(
        f"{describe(sha)} ({count} runs)" for sha, count in runs_per_revision.items()
    )


def _study_arguments(
    description: str, default_seeds: list[int], data_sets: list[str] | None = None
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", type=int, nargs="+", default=default_seeds)
    parser.add_argument("--collect", action="store_true", help="tabulate finished runs only")
    if data_sets:
        parser.add_argument(
            "--data",
            choices=data_sets,
            default=data_sets[0],
            help=f"the data set to study (default {data_sets[0]})",
        )
    return parser.parse_args()


def require_finished(jobs: list[StudyJob], root: Path) -> None:
    """Stop with one line when a study is tabulated (``--collect``) before all its runs have
    finished, instead of failing on the first missing metrics file."""
    missing = [job.name for job in jobs if not job_finished(root / job.name)]
    if missing:
        raise SystemExit(
            f"--collect: {len(missing)} of {len(jobs)} runs have not finished under {root} "
            f"(first: {missing[0]}); run the study without --collect to train them"
        )


def study_main(
    description: str,
    root: Path,
    jobs: Callable[[list[int]], list[StudyJob]],
    report: Callable[[list[int]], str],
    results: Path,
    default_seeds: list[int],
) -> None:
    """The command line every study script has: train what is missing under ``root`` (unless
    ``--collect``), then write ``report(seeds)`` to ``results`` and print it."""
    args = _study_arguments(description, default_seeds)
    if args.collect:
        require_finished(jobs(args.seeds), root)
    else:
        run_study(jobs(args.seeds), root)
    write_results(results, report(args.seeds))


@dataclass(frozen=True)
class DataRecipe:
    """A data set a study can run on, with the training recipe it uses there: every job is
    ``experiment=<experiment> <overrides> <the study's own overrides>``; ``base_lr`` is the
    learning rate at 32 images per optimizer step. ``suffix`` keeps the data sets' runs and
    reports apart: runs in ``logs/studies/<study><suffix>``, report ``results<suffix>.md``."""

    name: str
    experiment: str
    overrides: tuple[str, ...]
    base_lr: float
    description: str
    suffix: str = ""

    def lr(self, batch: int) -> float:
        """The linear scaling rule: the learning rate for ``batch`` images per optimizer step."""
        return self.base_lr * batch / 32


# The Fashion-MNIST recipe of the norm studies (conf/experiment/fashion_norm_study.yaml).
FASHION_MNIST = DataRecipe(
    "fashion_mnist",
    "fashion_norm_study",
    (),
    base_lr=0.1,
    description=(
        "DenseNet-BC (L=40, k=12) on Fashion-MNIST at 16 px: a stratified 10,000 of the training "
        "images, 1 epoch, SGD with Nesterov momentum and a one-cycle schedule, no augmentation; "
        "test accuracy on the official 10,000 test images"
    ),
)


def data_study_main(
    description: str,
    study: str,
    recipes: list[DataRecipe],
    jobs: Callable[[DataRecipe, list[int]], list[StudyJob]],
    report: Callable[[DataRecipe, Path, list[int]], str],
    default_seeds: list[int],
) -> None:
    """:func:`study_main` for a study that runs on several data sets (``--data``, default the
    first recipe's): runs under ``logs/studies/<study><suffix>``, the report
    ``report(recipe, root, seeds)`` in ``experiments/<study>/results<suffix>.md``. Identical
    finished runs of other studies are copied instead of trained again (:func:`find_twin`)."""
    by_name = {recipe.name: recipe for recipe in recipes}
    args = _study_arguments(description, default_seeds, list(by_name))
    recipe = by_name[args.data]
    root = study_root(study + recipe.suffix)
    if args.collect:
        require_finished(jobs(recipe, args.seeds), root)
    else:
        run_study(jobs(recipe, args.seeds), root, reuse_from=root.parent)
    results = REPO_ROOT / "experiments" / study / f"results{recipe.suffix}.md"
    write_results(results, report(recipe, root, args.seeds))


def configuration_study_main(
    description: str,
    study: str,
    experiment: str,
    configurations: dict[str, Configuration],
    report: Callable[[list[int]], str],
    default_seeds: list[int],
) -> None:
    """:func:`study_main` for a study that trains every configuration once per seed, with runs
    under ``logs/studies/<study>`` and the report in ``experiments/<study>/results.md``."""
    study_main(
        description,
        study_root(study),
        lambda seeds: configuration_jobs(experiment, configurations, seeds),
        report,
        REPO_ROOT / "experiments" / study / "results.md",
        default_seeds,
    )


def study_root(study: str) -> Path:
    """Where a study's runs land: ``logs/studies/<study>``."""
    return REPO_ROOT / "logs" / "studies" / study


def write_results(path: Path, text: str) -> None:
    """Write a study's report to ``path`` and print it."""
    path.write_text(text)
    print(text)


def single_run(task: str, experiment: str, argv: list[str]) -> tuple[Path, float, list[str]]:
    """The command line of a one-run study: train ``experiment`` once with the Hydra overrides in
    ``argv``, or with ``--from-run RUN_DIR --minutes M`` re-tabulate an earlier run. Returns the
    run dir, its wall time in seconds and the overrides it was started with (less the experiment
    and hydra.* ones, which only place the run)."""
    if argv[:1] == ["--from-run"]:
        run_dir, seconds = Path(argv[1]), 60 * float(argv[3])
    else:
        run_dir = study_run_dir(task, experiment)
        seconds = run_training(experiment, argv, run_dir)
    overrides = [o for o in saved_overrides(run_dir) if not o.startswith(("experiment=", "hydra."))]
    return run_dir, seconds, overrides


def collect_test_errors(root: Path, names: list[str], seeds: list[int]) -> dict[str, list[float]]:
    """Test error in % (100 × (1 − test/acc)) of every configuration, one entry per seed."""
    return {
        name: [100 * (1 - accuracy) for accuracy in values]
        for name, values in collect(root, names, seeds, "test/acc").items()
    }
