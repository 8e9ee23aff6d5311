"""The command line every study script has, and the one of a one-run experiment script."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from experiments.lib.jobs import (
    REPO_ROOT,
    StudyJob,
    job_finished,
    run_evaluations,
    run_study,
    run_training,
    saved_overrides,
    study_root,
    study_run_dir,
)
from experiments.lib.recipes import DEFAULT_SEEDS, DataRecipe
from experiments.lib.results import RunTable, has_every_run, write_runs_csv


def study_dir(study: str) -> Path:
    """Where a study's script, runs.csv, results.md and figures live: ``experiments/<study>``."""
    return REPO_ROOT / "experiments" / study


def _study_arguments(description: str, data_sets: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", type=int, nargs="+", default=DEFAULT_SEEDS)
    parser.add_argument(
        "--collect",
        action="store_true",
        help="train nothing: tabulate the finished runs, or the committed runs.csv",
    )
    if len(data_sets) > 1:
        parser.add_argument(
            "--data",
            choices=data_sets,
            default=data_sets[0],
            help=f"the data set to study (default {data_sets[0]})",
        )
    return parser.parse_args()


def study_table(jobs: list[StudyJob], root: Path, runs_csv: Path) -> RunTable:
    """The study's runs: from the run dirs under ``root`` when every job has finished there
    (rewriting ``runs_csv`` from them), else from ``runs_csv`` if it lists every job. Stops with
    one line when neither holds them all, instead of failing on the first missing file."""
    if all(job_finished(root / job.name) for job in jobs):
        write_runs_csv(runs_csv, root, jobs)
    elif not has_every_run(runs_csv, jobs):
        missing = [job.name for job in jobs if not job_finished(root / job.name)]
        raise SystemExit(
            f"--collect: {len(missing)} of {len(jobs)} runs have not finished under {root} "
            f"(first: {missing[0]}) and {runs_csv} does not list them all; run the study "
            "without --collect to train them"
        )
    names = {job.name for job in jobs}
    return RunTable(tuple(row for row in RunTable.read(runs_csv).rows if row["run"] in names))


def study_main(
    description: str,
    study: str,
    recipes: list[DataRecipe],
    jobs: Callable[[DataRecipe, list[int]], list[StudyJob]],
    report: Callable[[DataRecipe, RunTable, Path], str],
    reuse_runs: bool = False,
    evaluation: str | None = None,
) -> None:
    """Train what is missing of ``jobs(recipe, seeds)`` under ``logs/studies/<study><suffix>``
    (unless ``--collect``), record the runs in ``experiments/<study>/runs<suffix>.csv``, and
    write ``report(recipe, runs, experiments/<study>)`` to ``results<suffix>.md`` there.
    ``--data`` picks the recipe (default the first); ``reuse_runs``: copy identical finished runs
    of other studies instead of training them again (:func:`~experiments.lib.jobs.find_twin`);
    ``evaluation``: a module that measures a trained run after training
    (:func:`~experiments.lib.jobs.run_evaluations`)."""
    by_name = {recipe.name: recipe for recipe in recipes}
    args = _study_arguments(description, list(by_name))
    recipe = by_name[getattr(args, "data", recipes[0].name)]
    root = study_root(study + recipe.suffix)
    here = study_dir(study)
    job_list = jobs(recipe, args.seeds)
    if not args.collect:
        run_study(job_list, root, reuse_from=root.parent if reuse_runs else None)
        if evaluation is not None:
            run_evaluations(job_list, root, evaluation)
    table = study_table(job_list, root, here / f"runs{recipe.suffix}.csv")
    write_results(here / f"results{recipe.suffix}.md", report(recipe, table, here))


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
