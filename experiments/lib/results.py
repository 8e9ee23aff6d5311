"""A study's results: its runs as one ``runs.csv`` row each (what varied, the seed, every final
metric, the validation curves, time, commit, machine), and the tables and lines its results.md
is made of, all computed from those rows, so that a committed runs.csv re-renders the report."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from experiments.lib.jobs import STUDY_METRICS, StudyJob, job_record, study_seconds
from experiments.lib.recipes import DataRecipe
from normlab.collect.comparison import Cell, cells_by
from normlab.collect.run_sources import final_metrics

SEED_SUFFIX = "_seed"


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    """The rows of the run's CSV log (one per logging step; empty cells where nothing was logged)."""
    with (run_dir / "csv" / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def column(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    """``(epoch, value)`` for every row that logged ``key``."""
    return [(int(r["epoch"]), float(r[key])) for r in rows if r.get(key)]


def configuration_of(job_name: str) -> str:
    """The configuration a study job belongs to: its name less ``_seed<seed>``."""
    return job_name.rsplit(SEED_SUFFIX, 1)[0]


def run_row(root: Path, job: StudyJob) -> dict[str, str]:
    """One finished job as a runs.csv row: its configuration, the overrides it was trained with
    (one column per key), every metric's final value, ``<metric>@<epoch>`` for the validation
    curves, what the study measured of it after training (``study_metrics.json``), and the
    job's time, commit and machine."""
    run_dir = root / job.name
    record = job_record(run_dir)
    sha = (
        (run_dir / "git_sha.txt").read_text().strip() if (run_dir / "git_sha.txt").is_file() else ""
    )
    commit, dirty, _ = sha.partition("-dirty")
    row = {
        "run": job.name,
        "configuration": configuration_of(job.name),
        "experiment": job.experiment,
        "processes": str(job.processes),
    }
    row.update(override.split("=", 1) for override in job.overrides)
    # A run may log no metrics (trainer.fast_dev_run): its row still records time and code.
    if (run_dir / "csv" / "metrics.csv").is_file():
        finals = final_metrics(run_dir / "csv" / "metrics.csv")
        row.update((key, repr(value)) for key, value in finals.items())
        logged = read_metrics(run_dir)
        for key in (key for key in finals if key.startswith("val/")):
            row.update((f"{key}@{epoch + 1}", repr(v)) for epoch, v in column(logged, key))
    if (run_dir / STUDY_METRICS).is_file():
        measured = json.loads((run_dir / STUDY_METRICS).read_text())
        row.update((key, repr(float(value))) for key, value in measured.items())
    row.update(
        wall_seconds=f"{record['seconds']:.1f}",
        cpu_seconds=f"{record['cpu_seconds']:.1f}" if "cpu_seconds" in record else "",
        reused="1" if "reused_from" in record else "0",
        commit=commit or "unknown",
        dirty="1" if dirty else "0",
        machine=record.get("machine", ""),
        torch=record.get("torch", ""),
        date=record.get("finished", ""),
    )
    return row


def write_runs_csv(path: Path, root: Path, jobs: list[StudyJob]) -> None:
    """Every job's :func:`run_row` into ``path``; ``study_wall_seconds`` is the wall time of the
    one call that trained them all, when there was one."""
    rows = [run_row(root, job) for job in jobs]
    whole = study_seconds(root, len(jobs))
    for row in rows:
        row["study_wall_seconds"] = "" if whole is None else f"{whole:.1f}"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)


@dataclass(frozen=True)
class RunTable:
    """A study's runs.csv, read back: cells by configuration, in the rows' seed order."""

    rows: tuple[dict[str, str], ...]

    @classmethod
    def read(cls, path: Path) -> RunTable:
        with path.open(newline="") as handle:
            return cls(tuple(csv.DictReader(handle)))

    @property
    def seeds(self) -> list[int]:
        return list(dict.fromkeys(int(row["seed"]) for row in self.rows))

    def runs(self, configuration: str) -> list[dict[str, str]]:
        found = [row for row in self.rows if row["configuration"] == configuration]
        if not found:
            raise KeyError(f"no run of configuration {configuration!r} in runs.csv")
        return found

    def cell(self, configuration: str, metric: str) -> Cell:
        """A configuration's values of ``metric``, one per seed."""
        cell = cells_by(self.runs(configuration), ["configuration"], metric).get((configuration,))
        if cell is None or cell.n < len(self.runs(configuration)):
            raise KeyError(f"runs.csv: a run of {configuration!r} has no {metric!r}")
        return cell

    def error(self, configuration: str) -> Cell:
        """Test error in % (100 × (1 − test/acc)), one value per seed."""
        return Cell(tuple(100 * (1 - v) for v in self.cell(configuration, "test/acc").values))

    def minutes(self, configuration: str) -> float:
        """Mean wall minutes of a configuration's runs."""
        runs = self.runs(configuration)
        return sum(float(row["wall_seconds"]) for row in runs) / 60 / len(runs)

    def curves(self, configuration: str, metric: str) -> list[list[tuple[int, float]]]:
        """Every seed's ``(epoch, value)`` of a validation metric, epochs counted from 1."""
        prefix = f"{metric}@"
        return [
            [
                (int(k[len(prefix) :]), float(v))
                for k, v in row.items()
                if k.startswith(prefix) and v
            ]
            for row in self.runs(configuration)
        ]


def has_every_run(path: Path, jobs: Iterable[StudyJob]) -> bool:
    """Whether the runs.csv at ``path`` holds a row for every job."""
    if not path.is_file():
        return False
    listed = {row["run"] for row in RunTable.read(path).rows}
    return all(job.name in listed for job in jobs)


def results_table(cells: dict[str, Cell], digits: int = 1) -> list[str]:
    """Markdown rows: configuration | one value per seed | n | mean ± std."""
    width = max(cell.n for cell in cells.values())
    header = "| configuration | " + " | ".join(f"run {i + 1}" for i in range(width))
    rows = [header + " | n | mean ± std |", "|---|" + "---:|" * (width + 2)]
    for name, cell in cells.items():
        values = [f"{v:.{digits}f}" for v in cell.values] + ["—"] * (width - cell.n)
        rows.append(f"| {name} | {' | '.join(values)} | {cell.n} | **{cell.text(digits)}** |")
    return rows


def study_time_line(table: RunTable) -> str:
    """How long the study's runs took: wall and CPU run-minutes (CPU time over 2 cores is what
    the study needs on an otherwise idle 2-core machine)."""
    rows = table.rows
    wall = sum(float(row["wall_seconds"]) for row in rows) / 60
    line = f"{len(rows)} runs, {wall:.0f} run-minutes of wall time"
    if all(row.get("cpu_seconds") for row in rows):
        cpu = sum(float(row["cpu_seconds"]) for row in rows) / 60
        line += f", {cpu:.0f} CPU-minutes (≈ {cpu / 2:.0f} min on 2 idle cores)"
    reused = [row for row in rows if row.get("reused") == "1"]
    if reused:
        minutes = sum(float(row["wall_seconds"]) for row in reused) / 60
        line += (
            f"; {len(reused)} of the runs ({minutes:.0f} run-minutes) are copies of identical "
            "runs of another study"
        )
    whole = {row.get("study_wall_seconds", "") for row in rows}
    if len(whole) == 1 and (seconds := whole.pop()):
        line += f"; the whole study took {float(seconds) / 60:.0f} min of wall time in one go"
        if reused:
            line += " (training the others)"
    return line


def _count(items: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def study_code_line(table: RunTable) -> str:
    """Which commit the study's runs trained from, so a table made from runs of different or
    uncommitted code says so."""

    def describe(revision: tuple[str, str]) -> str:
        commit, dirty = revision
        if commit == "unknown":
            return "an unknown commit"
        return f"commit {commit[:7]}" + (" with uncommitted changes" if dirty == "1" else "")

    revisions = _count(f"{row['commit']} {row['dirty']}" for row in table.rows)
    described = {describe(tuple(key.split(" "))): count for key, count in revisions.items()}
    if len(described) == 1:
        return f"Code: {next(iter(described))}"
    return "Code: " + ", ".join(f"{what} ({count} runs)" for what, count in described.items())


def machine_summary(table: RunTable) -> str:
    """The machines (cores, GPU, torch build) and dates the runs were trained on."""
    machines = _count(row.get("machine") or "an unrecorded machine" for row in table.rows)
    dates = sorted({row["date"] for row in table.rows if row.get("date")})
    text = "; ".join(
        machine if len(machines) == 1 else f"{machine} ({count} runs)"
        for machine, count in machines.items()
    )
    if dates:
        text += f", {dates[0]}" + (f" to {dates[-1]}" if len(dates) > 1 else "")
    return text


def report_header(study: str, recipe: DataRecipe, run: str, table: RunTable) -> list[str]:
    """The first lines of every study's results.md: how to rerun it, what each run is, the
    recipe, and which machines, how long and which code the runs in runs.csv took."""
    data_flag = f"--data {recipe.name}" if recipe.suffix else ""
    arguments = f' ARGS="{data_flag}"' if data_flag else ""
    command = f"python -m experiments.{study}.run" + (f" {data_flag}" if data_flag else "")
    return [
        f"# {study}: results",
        "",
        f"Command: `{command}` (`make study-{study.replace('_', '-')}{arguments}`); each run is "
        f"`{run}`.",
        f"Recipe: {recipe.description} (conf/experiment/{recipe.experiment}.yaml).",
        f"Machine: {machine_summary(table)}. {study_time_line(table)}. {study_code_line(table)}.",
        f"Per-run values: `runs{recipe.suffix}.csv` here, one row per run; seeds "
        f"{', '.join(map(str, table.seeds))}.",
        "",
    ]


def claim_rule_line(margins: str) -> str:
    """How the findings below a table are judged, with the margins the README states."""
    return (
        "Findings: each a claim about a difference a − b, judged by its 95 % Welch confidence "
        "interval (`normlab.collect.comparison`): a claimed direction agrees only if the interval "
        "excludes 0 on that side and disagrees if it excludes 0 on the other; a claim that a − b "
        f"stays within a margin ({margins}, stated in README.md before the numbers) agrees only "
        "if the whole interval lies inside it and disagrees if it lies entirely outside; "
        "everything else, and any cell of one run, is inconclusive."
    )
