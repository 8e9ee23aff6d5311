"""The one statistical rule, on made-up numbers whose intervals are computed by hand from table
values of Student's t (t_0.975 with 2, 4 and 10 degrees of freedom)."""

from __future__ import annotations

import math

import pytest

from normlab.collect.comparison import (
    Cell,
    Claim,
    Verdict,
    difference,
    direction_words,
    judged,
    level,
    welch_degrees_of_freedom,
)

T_2, T_4, T_10 = 4.302653, 2.776445, 2.228139


def test_a_cell_is_n_mean_and_sample_std():
    cell = Cell((1.0, 2.0, 3.0))
    assert (cell.n, cell.mean, cell.std) == (3, 2.0, 1.0)
    assert cell.text() == "2.0 ± 1.0"
    assert math.isnan(Cell((5.0,)).std)
    assert Cell((5.0,)).text() == "5.0"


def test_a_claimed_difference_agrees_or_disagrees_only_beyond_its_interval():
    # Equal spreads (std 1) and n = 3 each: df = 4, standard error sqrt(2/3).
    low, high = [1.0, 2.0, 3.0], [4.0, 5.0, 6.0]
    assert welch_degrees_of_freedom(Cell(tuple(low)), Cell(tuple(high))) == pytest.approx(4)
    found = difference(low, high)
    half = T_4 * math.sqrt(2 / 3)
    assert (found.mean, found.low, found.high) == pytest.approx((-3, -3 - half, -3 + half))
    assert found.text(3) == "-3.000 [95 % CI -5.267, -0.733]"
    assert Claim.lower().judge(found) is Verdict.AGREES
    assert Claim.higher().judge(found) is Verdict.DISAGREES
    assert direction_words(found) == "lower"
    assert judged(Claim.higher(), high, low) == "+3.0 [95 % CI +0.7, +5.3] — **agrees**"

    # n = 6 each with std sqrt(3.5): df = 10; the interval holds 0, so no direction is shown.
    a, b = [1.0, 2, 3, 4, 5, 6], [2.0, 3, 4, 5, 6, 7]
    found = difference(a, b)
    half = T_10 * math.sqrt(2 * 3.5 / 6)
    assert (found.low, found.high) == pytest.approx((-1 - half, -1 + half))
    assert Claim.lower().judge(found) is Verdict.INCONCLUSIVE
    assert Claim.higher().judge(found) is Verdict.INCONCLUSIVE
    assert direction_words(found) == "inconclusive"


def test_an_equivalence_claim_needs_the_whole_interval_inside_its_margin():
    # b has no spread, so Welch's df is a's n − 1 = 2; standard error 0.1 / sqrt(3).
    a, b = [0.9, 1.0, 1.1], [1.0, 1.0, 1.0]
    found = difference(a, b)
    half = T_2 * 0.1 / math.sqrt(3)  # 0.248414
    assert (found.low, found.high) == pytest.approx((-half, half))
    assert Claim.within(0.3).judge(found) is Verdict.AGREES  # inside the margin
    assert Claim.within(0.2).judge(found) is Verdict.INCONCLUSIVE  # straddles it
    # Two points apart: the whole interval [1.75, 2.25] lies outside ±0.3.
    far = difference([2.9, 3.0, 3.1], b)
    assert (far.low, far.high) == pytest.approx((2 - half, 2 + half))
    assert Claim.within(0.3).judge(far) is Verdict.DISAGREES
    # "Not worse" (error may be lower by any amount, higher by at most the margin).
    assert Claim.at_most(0.3).judge(difference(b, [2.9, 3.0, 3.1])) is Verdict.AGREES
    assert Claim.at_most(0.3).judge(far) is Verdict.DISAGREES
    assert Claim.at_least(0.3).judge(far) is Verdict.AGREES


def test_deterministic_cells_have_a_zero_width_interval():
    found = difference([2.0, 2.0], [1.0, 1.0])
    assert (found.low, found.high) == (1.0, 1.0)
    assert Claim.higher().judge(found) is Verdict.AGREES
    assert Claim.within(0.5).judge(found) is Verdict.DISAGREES


def test_a_single_run_decides_nothing():
    found = difference([1.0], [5.0, 6.0, 7.0])
    assert not found.decidable and math.isnan(found.low)
    assert found.text() == "-5.0 (no CI: n = 1)"
    for claim in (Claim.lower(), Claim.higher(), Claim.within(100.0), Claim.at_most(100.0)):
        assert claim.judge(found) is Verdict.INCONCLUSIVE
    assert direction_words(found) == "inconclusive (n < 2)"


def test_a_level_is_judged_by_its_mean_interval():
    # mean 2.0, std 0.2, n 3: half-width t_0.975(2)·0.2/√3
    half = T_2 * 0.2 / math.sqrt(3)
    found = level(Cell((1.8, 2.0, 2.2)))
    assert found.mean == pytest.approx(2.0)
    assert (found.low, found.high) == pytest.approx((2.0 - half, 2.0 + half))
    assert Claim.at_most(2.0).judge(found) is Verdict.INCONCLUSIVE
    assert Claim.at_most(2.0).judge(level(Cell((1.0, 1.1, 1.2)))) is Verdict.AGREES
    assert Claim.at_most(2.0).judge(level(Cell((2.9, 3.0, 3.1)))) is Verdict.DISAGREES
    assert Claim.at_most(2.0).judge(level(Cell((1.0,)))) is Verdict.INCONCLUSIVE
