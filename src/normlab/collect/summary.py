"""The table ``python -m normlab.collect`` prints: runs grouped by config keys, each group's n and
mean ± std, and against a baseline group the difference with its 95 % interval and the verdict
words of :mod:`normlab.collect.comparison`; then the runs that are not in it and why."""

from __future__ import annotations

import csv
import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from normlab.collect.comparison import (
    Cell,
    Claim,
    Difference,
    cells_by,
    difference,
    direction_words,
)
from normlab.collect.run_sources import COMPLETED, CollectedRun
from normlab.errors import ConfigError


@dataclass(frozen=True)
class Baseline:
    """``--baseline key=value``: the group every other group is compared with, at the same values
    of the other ``--by`` keys; ``margin`` (``--margin``) turns the comparison into an
    equivalence claim."""

    key: str
    value: str
    margin: float | None = None

    @classmethod
    def parse(cls, text: str, by: Sequence[str], margin: float | None) -> Baseline:
        key, equals, value = text.partition("=")
        if not equals or key not in by:
            raise ConfigError(
                f"--baseline {text!r}: expected KEY=VALUE with KEY one of --by's keys "
                f"({', '.join(by)}), e.g. --baseline {by[0]}=bn"
            )
        return cls(key, value, margin)

    def verdict(self, found: Difference) -> str:
        if self.margin is None:
            return direction_words(found)
        return Claim.within(self.margin).judge(found).value


@dataclass(frozen=True)
class SummaryRow:
    group: tuple[str, ...]
    cell: Cell
    versus: Difference | None = None
    verdict: str = ""


def _check_keys(runs: list[CollectedRun], by: Sequence[str], metric: str) -> None:
    known = {key for run in runs for key in run.config}
    for key in by:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"--by {key}: no run has this config key{hint}")
    logged = sorted({key for run in runs for key in run.metrics})
    if not any(metric in run.metrics for run in runs):
        raise ConfigError(
            f"--metric {metric}: no run logged it; the runs logged: "
            + (", ".join(logged) if logged else "no metrics at all")
        )


def summarize(
    runs: list[CollectedRun], by: Sequence[str], metric: str, baseline: Baseline | None
) -> list[SummaryRow]:
    """One row per group of the completed runs that logged ``metric``."""
    _check_keys(runs, by, metric)
    counted = [run.fields for run in runs if run.status == COMPLETED]
    cells = cells_by(counted, by, metric)
    if baseline is None:
        return [SummaryRow(group, cell) for group, cell in cells.items()]
    index = list(by).index(baseline.key)
    seen = sorted({group[index] for group in cells})
    if baseline.value not in seen:
        raise ConfigError(
            f"--baseline {baseline.key}={baseline.value}: no completed run has it; "
            f"{baseline.key} is one of {', '.join(seen)}"
        )
    rows = []
    for group, cell in cells.items():
        reference = cells.get((*group[:index], baseline.value, *group[index + 1 :]))
        if group[index] == baseline.value or reference is None:
            rows.append(SummaryRow(group, cell))
            continue
        found = difference(cell, reference)
        rows.append(SummaryRow(group, cell, found, baseline.verdict(found)))
    return rows


def left_out(runs: list[CollectedRun], metric: str) -> list[str]:
    """A line for every run not in the table: failed, unfinished, or without the metric."""
    lines = []
    for run in runs:
        if run.status != COMPLETED:
            lines.append(f"- {run.status}: {run.source}" + (f": {run.error}" if run.error else ""))
        elif metric not in run.metrics:
            lines.append(f"- no {metric}: {run.source}")
    return lines


def _number(value: float, digits: int) -> str:
    return f"{value:.{digits}g}" if abs(value) >= 10**digits else f"{value:.{digits}f}"


def markdown(
    rows: list[SummaryRow],
    by: Sequence[str],
    metric: str,
    baseline: Baseline | None,
    digits: int,
) -> list[str]:
    header = [*by, "n", f"{metric} mean ± std"]
    if baseline is not None:
        words = "vs" if baseline.margin is None else f"within ±{baseline.margin:g} of"
        header += [f"− {baseline.value} [95 % CI]", f"{words} {baseline.value}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(by) + "---:|" * 2]
    if baseline is not None:
        lines[1] += "---:|---|"
    for row in rows:
        cells = [*row.group, str(row.cell.n), row.cell.text(digits)]
        if baseline is not None:
            cells += [row.versus.text(digits), row.verdict] if row.versus else ["—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_csv(path: Path, rows: list[SummaryRow], by: Sequence[str], metric: str) -> None:
    """The table with plain numbers: n, mean, std, and the difference with its interval."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                *by,
                "n",
                f"{metric} mean",
                f"{metric} std",
                "difference",
                "ci_low",
                "ci_high",
                "verdict",
            ]
        )
        for row in rows:
            versus = row.versus
            numbers = [versus.mean, versus.low, versus.high] if versus else ["", "", ""]
            writer.writerow(
                [*row.group, row.cell.n, row.cell.mean, row.cell.std, *numbers, row.verdict]
            )
