"""experiments/lib/plots.py: when a cell plot switches to a log axis, and how its labels wrap."""

from __future__ import annotations

from experiments.lib.plots import _failed_run_among, _tick_label


def test_only_an_outlier_far_above_the_typical_cell_makes_the_axis_logarithmic():
    # population_statistics: momentum 0.001 fails at 89 % error where the others reach 10-15 %.
    assert _failed_run_among([10.2, 11.0, 14.8, 12.5, 89.0])
    # retinanet_norms: mAP from 0.001 to 0.073 reads on one linear axis.
    assert not _failed_run_among([0.001, 0.073, 0.073, 0.009])
    # A zero cannot go on a log axis.
    assert not _failed_run_among([0.0, 1.0, 90.0])


def test_tick_labels_wrap_and_keep_a_parenthesis_on_its_own_line():
    assert _tick_label("bn + gn heads") == "bn + gn heads"
    assert _tick_label("syncbn 2×4 + gn heads") == "syncbn 2×4 + gn\nheads"
    assert _tick_label("ghost_bn (virtual 2)") == "ghost_bn\n(virtual 2)"
