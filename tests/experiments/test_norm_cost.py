"""norm_cost's verdict on "at most 2× bn", on made-up runs: per-run ratios, their interval, and
the compiled formula named as the floor where it misses too."""

from __future__ import annotations

import pytest

from experiments.bench import norm_cost


def made_up_runs(ratios: dict[str, list[float]]) -> list[dict]:
    """One run per ratio: bn takes 1 s in each of 3 rounds, a candidate its ratio (the middle
    round 10 % slower, which the per-run median ignores)."""
    runs = []
    for index in range(len(ratios["bn"])):
        rounds = {name: [r[index], 1.1 * r[index], r[index]] for name, r in ratios.items()}
        runs.append({layout: rounds for layout in norm_cost.MEMORY_FORMATS})
    return runs


RATIOS = {
    "bn": [1.0, 1.0, 1.0],
    "quick": [1.2, 1.3, 1.1],
    "near": [1.7, 2.3, 2.0],
    "slow": [3.0, 3.2, 2.8],
    "slow compiled": [2.5, 2.6, 2.4],
    "near compiled": [1.0, 1.1, 0.9],
}


def test_each_run_gives_one_ratio_and_the_mean_its_interval():
    table = norm_cost.format_table(made_up_runs(RATIOS), "NCHW", {"bn": 100, "quick": 300})
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in table.splitlines()[2:]}
    assert rows["quick"].endswith("| 1.20 1.30 1.10 | 1.200 [0.952, 1.448] | yes | 3.00 |")
    assert "| no | — |" in rows["slow"]
    assert "| inconclusive | — |" in rows["near"]


def test_a_miss_is_shown_beside_its_compiled_formula():
    lines = norm_cost.verdict_lines(made_up_runs(RATIOS))
    slow = next(line for line in lines if line.startswith("- slow on channels_last"))
    assert slow.startswith("- slow on channels_last: 3.000 [2.503, 3.497], no.")
    assert "2.500 [2.252, 2.748], over the line too: a measured floor" in slow
    assert slow.endswith(": eager is slower.")  # +0.5, Welch's interval excludes 0
    near = next(line for line in lines if line.startswith("- near on NCHW"))
    assert ", inconclusive." in near and "the eager path is what misses" in near
    assert near.endswith(": eager is slower.")
    runs = made_up_runs({**RATIOS, "slow compiled": [3.1, 2.7, 3.2]})
    slow = next(line for line in norm_cost.verdict_lines(runs) if line.startswith("- slow on"))
    assert slow.endswith(": no difference shown.")
    assert not any(line.startswith("- quick") for line in lines)


def test_one_run_is_inconclusive():
    runs = made_up_runs({name: r[:1] for name, r in RATIOS.items()})
    assert "1.200 (n = 1, no interval)" in "\n".join(norm_cost.verdict_lines(runs))
    table = norm_cost.format_table(runs, "NCHW", {"bn": 100})
    assert "| quick | " in table and "| inconclusive |" in table


def test_a_failed_run_stops_with_one_line():
    with pytest.raises(SystemExit, match=r"norm_cost: run 1 of 2 failed: .*shape"):
        norm_cost.runs_in_fresh_processes(["--shape", "1"], 2)
