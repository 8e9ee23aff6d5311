"""The studies' figures, drawn from runs.csv: every seed a dot, each configuration's mean with its
95 % confidence interval, a value axis fitted to the data (not forced to 0, which would flatten
differences of a few points), and a title naming the recipe, the seeds and the commit."""

from __future__ import annotations

import statistics
import textwrap
from itertools import pairwise
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from experiments.lib.jobs import slug
from experiments.lib.results import RunTable, study_code_line
from normlab.collect.comparison import Cell
from normlab.collect.figure import draw_cell


def caption(table: RunTable, recipe: str) -> str:
    """A figure's second title line: the recipe, how many seeds and which code."""
    seeds = table.seeds
    return f"{recipe}; n = {len(seeds)} seeds ({', '.join(map(str, seeds))}); " + study_code_line(
        table
    ).removeprefix("Code: ")


def _finish(figure: Figure, axes: Axes, title: str, note: str, path: Path) -> None:
    axes.set_title(f"{title}\n{note}", fontsize=7)
    axes.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path)


def _failed_run_among(means: list[float]) -> bool:
    """A cell that failed (tens of % of error where most others reach a few) would flatten the
    rest on a linear axis: then the axis is logarithmic. Only an outlier above the typical cell
    counts: cells that all spread over one linear range (detection mAP from 0.001 to 0.07)
    read better on it."""
    return min(means) > 0 and max(means) > 3 * statistics.median(means)


def _tick_label(name: str) -> str:
    """A configuration's name on lines of at most ~16 characters, a parenthesis on its own line,
    so that neighbouring labels do not run into each other."""
    head, paren, rest = name.partition(" (")
    lines = textwrap.wrap(head, 16, break_long_words=False)
    return "\n".join([*lines, f"({rest}"] if paren else lines)


def _log_axis(axes: Axes) -> None:
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(ScalarFormatter())
    axes.yaxis.set_minor_formatter(ScalarFormatter())


def plot_cells(
    groups: dict[str, dict[str, Cell]], ylabel: str, title: str, note: str, path: Path
) -> None:
    """Configurations along the x axis; ``groups`` (e.g. batch 2 and batch 32) side by side in
    their own colours, each seed a dot and the mean with its 95 % CI bar."""
    names = list(dict.fromkeys(name for cells in groups.values() for name in cells))
    figure = Figure(figsize=(1.6 + 0.9 * len(names) * max(1, len(groups) / 2), 4.0), dpi=120)
    axes = figure.add_subplot()
    width = 0.7 / len(groups)
    for index, (group, cells) in enumerate(groups.items()):
        offset = (index - (len(groups) - 1) / 2) * width
        for position, name in enumerate(names):
            if name in cells:
                label = group if position == names.index(next(iter(cells))) and group else None
                draw_cell(axes, position + offset, cells[name], f"C{index}", label)
    axes.set_xticks(range(len(names)), [_tick_label(name) for name in names], fontsize=7)
    means = [cell.mean for cells in groups.values() for cell in cells.values()]
    logarithmic = _failed_run_among(means)
    if logarithmic:
        _log_axis(axes)
    axes.set_ylabel(ylabel + (" (log)" if logarithmic else ""))
    if len(groups) > 1:
        axes.legend(fontsize=7)
    _finish(figure, axes, title, note, path)


def plot_series(
    series: dict[str, dict[int, Cell]],
    xs: list[int],
    xlabel: str,
    ylabel: str,
    title: str,
    note: str,
    path: Path,
) -> None:
    """One line per series over a logarithmic x axis (e.g. the batch), each seed a dot and each
    mean with its 95 % CI; a line joins two means only where no x of ``xs`` between them was
    left unmeasured."""
    figure = Figure(figsize=(6.4, 4.2), dpi=120)
    axes = figure.add_subplot()
    for index, (name, cells) in enumerate(series.items()):
        color = f"C{index}"
        # A small horizontal offset per series keeps equal results apart.
        shift = 1.04 ** (index - (len(series) - 1) / 2)
        measured = sorted(cells)
        for x in measured:
            draw_cell(axes, x * shift, cells[x], color, name if x == measured[0] else None)
        for left, right in pairwise(measured):
            if xs.index(right) == xs.index(left) + 1:
                axes.plot(
                    [left * shift, right * shift],
                    [cells[left].mean, cells[right].mean],
                    color=color,
                )
    axes.set_xscale("log", base=2)
    axes.set_xticks(xs, [str(x) for x in xs])
    axes.set_xlabel(xlabel)
    means = [cell.mean for cells in series.values() for cell in cells.values()]
    logarithmic = _failed_run_among(means)
    if logarithmic:
        _log_axis(axes)
    axes.set_ylabel(ylabel + (" (log)" if logarithmic else ""))
    axes.legend(fontsize=7)
    _finish(figure, axes, title, note, path)


def plot_curves(
    curves: dict[str, list[list[tuple[int, float]]]], ylabel: str, title: str, note: str, path: Path
) -> None:
    """Per-epoch validation curves, the mean over seeds of each configuration, at the epochs
    where every seed was validated."""
    figure = Figure(figsize=(6, 3.8), dpi=120)
    axes = figure.add_subplot()
    for name, runs in curves.items():
        epochs = sorted(set.intersection(*(set(dict(run)) for run in runs)))
        means = [sum(dict(run)[epoch] for run in runs) / len(runs) for epoch in epochs]
        axes.plot(epochs, means, marker="o", label=name)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_xlabel("epoch")
    axes.set_ylabel(ylabel)
    axes.legend(fontsize=7)
    _finish(figure, axes, title, note, path)


def plot_errors(
    table: RunTable, names: list[str], title: str, experiment: str, path: Path
) -> dict[str, Cell]:
    """Each named configuration's test error (%) drawn to ``path``; returns the cells."""
    errors = {name: table.error(slug(name)) for name in names}
    plot_cells({"": errors}, "test error (%)", title, caption(table, experiment), path)
    return errors
