"""Drawing a cell of seeds: every run a dot, the mean with its 95 % confidence interval. Shared by
``normlab.collect --plot`` and the studies' figures."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from normlab.collect.comparison import Cell, mean_interval


def draw_cell(axes: Axes, x: float, cell: Cell, color: str, label: str | None = None) -> None:
    """Every value of ``cell`` as a dot at ``x`` and its mean with the 95 % interval (a bare mean
    marker for a single run, which has none)."""
    low, high = mean_interval(cell)
    axes.scatter([x] * cell.n, cell.values, color=color, s=10, alpha=0.6, zorder=3)
    if math.isnan(low):
        axes.scatter([x], [cell.mean], color=color, marker="_", s=200, zorder=4, label=label)
        return
    axes.errorbar(
        [x],
        [cell.mean],
        [[cell.mean - low], [high - cell.mean]],
        color=color,
        marker="_",
        markersize=14,
        capsize=4,
        zorder=4,
        label=label,
    )


def plot_groups(cells: dict[str, Cell], ylabel: str, title: str, path: Path) -> None:
    """One column per group along the x axis; the value axis fits the data (not forced to 0)."""
    figure = Figure(figsize=(1.6 + 0.9 * len(cells), 4.0), dpi=120)
    axes = figure.add_subplot()
    for index, cell in enumerate(cells.values()):
        draw_cell(axes, index, cell, f"C{index % 10}")
    axes.set_xticks(range(len(cells)), list(cells), fontsize=7, rotation=30, ha="right")
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=8)
    axes.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path)
