"""Full training runs (`make test-slow`): the numbers the README promises."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest

from cli import offline_env, run_train


def _train(run_dir: Path, *overrides: str) -> float:
    """Run the CLI as a user would; return the wall time in seconds."""
    start = time.monotonic()
    result = run_train(*overrides, f"hydra.run.dir={run_dir}", env=offline_env(), timeout=900)
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-3000:]
    return elapsed


def _test_accuracy(run_dir: Path) -> float:
    with (run_dir / "csv" / "metrics.csv").open() as handle:
        values = [row["test/acc"] for row in csv.DictReader(handle) if row.get("test/acc")]
    return float(values[-1])


@pytest.mark.slow
def test_default_experiment_trains_to_97_percent_in_under_3_minutes(tmp_path):
    elapsed = _train(tmp_path / "run", "experiment=densenet_digits")
    accuracy = _test_accuracy(tmp_path / "run")
    print(f"densenet_digits: test/acc={accuracy:.4f} in {elapsed:.0f} s")
    assert accuracy >= 0.97
    assert elapsed < 180


@pytest.mark.slow
def test_convnext_experiment_learns_digits(tmp_path):
    _train(tmp_path / "run", "experiment=convnext_digits")
    accuracy = _test_accuracy(tmp_path / "run")
    print(f"convnext_digits: test/acc={accuracy:.4f}")
    assert accuracy >= 0.95
