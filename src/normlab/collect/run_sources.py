"""Finished (and unfinished) runs read from disk: Hydra run dirs, the job dirs of a multirun
(the basic and Optuna sweepers', the Slurm launcher's) and offline wandb runs, each as its flat
config, the final value of every metric it logged, and whether it completed."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from normlab.collect.wandb_runs import OfflineRun, read_offline_run
from normlab.errors import ConfigError
from normlab.utils.sweep_report import OUTCOME_FILE

COMPLETED, FAILED, UNFINISHED = "completed", "failed", "unfinished"


@dataclass
class CollectedRun:
    """One run: where it is, its config as dotted keys, its metrics' final values, its status
    (completed, failed or unfinished) and, for a failed one, its error line."""

    source: Path
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    status: str = COMPLETED
    error: str = ""

    @property
    def fields(self) -> dict[str, Any]:
        """Config keys and metrics in one mapping, as the grouping reads them."""
        return {**self.config, **self.metrics}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"norm": {"name": "gn"}}`` → ``{"norm.name": "gn"}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def final_metrics(metrics_csv: Path) -> dict[str, float]:
    """The last value of every column of a run's ``csv/metrics.csv`` (epoch and step left out)."""
    final: dict[str, float] = {}
    with metrics_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            final.update((k, float(v)) for k, v in row.items() if v and k not in ("epoch", "step"))
    return final


def _numbers(values: Mapping[str, Any]) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in values.items()
        if isinstance(value, int | float)
        and not isinstance(value, bool)
        and not key.startswith("_")
    }


def _wandb_status(run: OfflineRun) -> tuple[str, str]:
    if not run.complete:
        return UNFINISHED, ""
    return (COMPLETED, "") if run.exit_code == 0 else (FAILED, f"exit code {run.exit_code}")


def read_run_dir(run_dir: Path) -> CollectedRun:
    """A Hydra run dir (or a multirun's job dir). Status: the job_outcome.json a multirun job
    writes; without one (a single run), completed once it logged a test metric (or any metric,
    when it was not to test), unfinished otherwise. Metrics: csv/metrics.csv, else the run's
    offline wandb summary."""
    run = CollectedRun(run_dir)
    resolved = run_dir / "config_resolved.yaml"
    composed = resolved if resolved.is_file() else run_dir / ".hydra" / "config.yaml"
    if composed.is_file():
        run.config = flatten(yaml.safe_load(composed.read_text()) or {})
    wandb_logs = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    if (run_dir / "csv" / "metrics.csv").is_file():
        run.metrics = final_metrics(run_dir / "csv" / "metrics.csv")
    elif wandb_logs:
        run.metrics = _numbers(read_offline_run(wandb_logs[-1]).summary)
    outcome = run_dir / OUTCOME_FILE
    if outcome.is_file():
        recorded = json.loads(outcome.read_text())
        run.status, run.error = recorded["status"], recorded.get("error") or ""
    elif run_dir.parent.joinpath("multirun.yaml").is_file():
        run.status = UNFINISHED  # a multirun job writes its outcome when it ends
    else:
        tested = any(key.startswith("test/") for key in run.metrics)
        run.status = (
            COMPLETED if tested or (run.metrics and not run.config.get("test")) else UNFINISHED
        )
    return run


def read_wandb_run(log: Path) -> CollectedRun:
    """An offline wandb run: its config (flattened) and summary."""
    offline = read_offline_run(log)
    status, error = _wandb_status(offline)
    config = flatten({k: v for k, v in offline.config.items() if not k.startswith("_")})
    return CollectedRun(log.parent, config, _numbers(offline.summary), status, error)


def _runs_under(path: Path) -> Iterator[CollectedRun]:
    if path.is_file() and path.suffix == ".wandb":
        yield read_wandb_run(path)
        return
    if (path / ".hydra").is_dir():
        yield read_run_dir(path)
        return
    run_dirs = sorted({hydra.parent for hydra in path.rglob(".hydra") if hydra.is_dir()})
    if run_dirs:
        yield from (read_run_dir(run_dir) for run_dir in run_dirs)
        return
    yield from (read_wandb_run(log) for log in sorted(path.rglob("run-*.wandb")))


def collect_runs(paths: Iterable[Path]) -> list[CollectedRun]:
    """Every run under ``paths``: a run dir, a multirun dir (its job dirs), any folder holding
    either, or offline wandb runs (a ``wandb/`` folder, an ``offline-run-*`` folder or its
    ``run-*.wandb`` file). A path that does not exist or holds no run is a ConfigError."""
    runs: list[CollectedRun] = []
    for path in paths:
        if not path.exists():
            raise ConfigError(f"{path}: no such file or directory")
        found = list(_runs_under(path))
        if not found:
            raise ConfigError(
                f"{path}: no runs there (looked for Hydra run dirs with .hydra/, multirun dirs "
                "and offline wandb runs, run-*.wandb)"
            )
        runs.extend(found)
    return runs
