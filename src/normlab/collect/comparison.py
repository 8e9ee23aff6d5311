"""normlab's one statistical rule for comparing runs that differ in their seed.

A cell (one configuration, several seeds) is its n, mean and sample standard deviation. Two cells
are compared by the difference of their means, a − b, with a 95 % confidence interval from
Welch's t (unequal variances, Welch–Satterthwaite degrees of freedom): the usual interval for
3–5 seeds, which assumes nothing about the two cells sharing a spread.

A claim about a − b is judged by where that interval lies:

- a claimed difference ("a is higher", "a is lower") **agrees** only if the interval excludes 0
  on the claimed side, and **disagrees** if it excludes 0 on the other;
- a claim that a − b lies in a range (equivalence, "matches" or "flat": −margin..margin; "not
  worse": −∞..margin), with the margin stated before the numbers, **agrees** only if the whole
  interval lies inside the range and **disagrees** if it lies entirely outside;
- anything else, and every comparison with a cell of fewer than 2 runs, is **inconclusive**.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from scipy.stats import t as student_t

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Cell:
    """The runs of one configuration: one value per seed."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n if self.values else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation (n − 1); NaN below 2 runs, where there is no spread."""
        if self.n < 2:
            return math.nan
        mean = self.mean
        return math.sqrt(sum((v - mean) ** 2 for v in self.values) / (self.n - 1))

    def text(self, digits: int = 1) -> str:
        """``mean ± std`` (the std left out for a single run)."""
        if self.n < 2:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


@dataclass(frozen=True)
class Difference:
    """a − b with its confidence interval (``low``, ``high``; NaN when a cell has n < 2)."""

    mean: float
    low: float
    high: float
    n: tuple[int, int]

    @property
    def decidable(self) -> bool:
        return min(self.n) >= 2

    def text(self, digits: int = 1) -> str:
        """``+4.2 [95 % CI +2.1, +6.3]``, or the reason there is no interval."""
        if not self.decidable:
            return f"{self.mean:+.{digits}f} (no CI: n = {min(self.n)})"
        return (
            f"{self.mean:+.{digits}f} [{100 * CONFIDENCE:.0f} % CI {self.low:+.{digits}f}, "
            f"{self.high:+.{digits}f}]"
        )


def welch_degrees_of_freedom(a: Cell, b: Cell) -> float:
    """Welch–Satterthwaite's degrees of freedom of the difference of two cells' means."""
    va, vb = a.std**2 / a.n, b.std**2 / b.n
    return (va + vb) ** 2 / (va**2 / (a.n - 1) + vb**2 / (b.n - 1))


def difference(a: Sequence[float] | Cell, b: Sequence[float] | Cell) -> Difference:
    """a − b with its 95 % Welch interval. Two cells without spread (every seed gave the same
    value, as deterministic code does) have a zero-width interval at their difference."""
    a, b = (x if isinstance(x, Cell) else Cell(tuple(x)) for x in (a, b))
    gap = a.mean - b.mean
    if min(a.n, b.n) < 2:
        return Difference(gap, math.nan, math.nan, (a.n, b.n))
    error = math.sqrt(a.std**2 / a.n + b.std**2 / b.n)
    if error == 0:
        return Difference(gap, gap, gap, (a.n, b.n))
    quantile = float(student_t.ppf(0.5 + CONFIDENCE / 2, welch_degrees_of_freedom(a, b)))
    return Difference(gap, gap - quantile * error, gap + quantile * error, (a.n, b.n))


class Verdict(str, Enum):
    AGREES = "agrees"
    DISAGREES = "disagrees"
    INCONCLUSIVE = "inconclusive"

    def __str__(self) -> str:
        return f"**{self.value}**"


@dataclass(frozen=True)
class Claim:
    """What a paper (or the study) says about a − b: a direction (``higher``: +1, ``lower``:
    −1), or a range it lies in (``low``..``high``, either end possibly infinite)."""

    direction: int = 0
    low: float = -math.inf
    high: float = math.inf

    @classmethod
    def higher(cls) -> Claim:
        return cls(direction=1)

    @classmethod
    def lower(cls) -> Claim:
        return cls(direction=-1)

    @classmethod
    def within(cls, margin: float) -> Claim:
        """Equivalence: |a − b| ≤ margin."""
        return cls(low=-margin, high=margin)

    @classmethod
    def at_most(cls, margin: float) -> Claim:
        """Not worse where higher is worse: a − b ≤ margin."""
        return cls(high=margin)

    @classmethod
    def at_least(cls, margin: float) -> Claim:
        """Not worse where lower is worse: a − b ≥ −margin."""
        return cls(low=-margin)

    def judge(self, found: Difference) -> Verdict:
        if not found.decidable:
            return Verdict.INCONCLUSIVE
        if self.direction:
            sign = self.direction
            if min(sign * found.low, sign * found.high) > 0:
                return Verdict.AGREES
            if max(sign * found.low, sign * found.high) < 0:
                return Verdict.DISAGREES
            return Verdict.INCONCLUSIVE
        if self.low <= found.low and found.high <= self.high:
            return Verdict.AGREES
        if found.high < self.low or found.low > self.high:
            return Verdict.DISAGREES
        return Verdict.INCONCLUSIVE


def judged(
    claim: Claim, a: Sequence[float] | Cell, b: Sequence[float] | Cell, digits: int = 1
) -> str:
    """``+4.2 [95 % CI +2.1, +6.3] — **agrees**``: the difference a − b, its interval and the
    claim's verdict, as the studies' results.md print them."""
    found = difference(a, b)
    return f"{found.text(digits)} — {claim.judge(found)}"


def direction_words(found: Difference) -> str:
    """The verdict words without a claim: which way the interval says a differs from b."""
    if not found.decidable:
        return "inconclusive (n < 2)"
    if found.low > 0:
        return "higher"
    if found.high < 0:
        return "lower"
    return "inconclusive"


def mean_interval(cell: Cell) -> tuple[float, float]:
    """The 95 % t interval of one cell's mean (NaN below 2 runs): the error bar of the plots."""
    if cell.n < 2:
        return math.nan, math.nan
    half = float(student_t.ppf(0.5 + CONFIDENCE / 2, cell.n - 1)) * cell.std / math.sqrt(cell.n)
    return cell.mean - half, cell.mean + half


def level(cell: Cell) -> Difference:
    """The cell's mean as a difference from 0, with its 95 % t interval (NaN below 2 runs): a
    :class:`Claim` judges a level ("a ratio at most 2") by the same rule as a difference."""
    low, high = mean_interval(cell)
    return Difference(cell.mean, low, high, (cell.n, cell.n))


def cells_by(
    records: Iterable[Mapping[str, Any]], keys: Sequence[str], metric: str
) -> dict[tuple[str, ...], Cell]:
    """The records grouped by their values of ``keys`` (as text, in the order first seen), each
    group's values of ``metric`` as a cell; records without the metric are left out."""
    groups: dict[tuple[str, ...], list[float]] = {}
    for record in records:
        value = record.get(metric)
        if value is None or value == "":
            continue
        groups.setdefault(tuple(str(record.get(key)) for key in keys), []).append(float(value))
    return {group: Cell(tuple(values)) for group, values in groups.items()}
