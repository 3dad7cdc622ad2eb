"""Sensitivity rules for magnitude cells (sums and means): dominance (n, k) and p %.

Both rules need, per cell and per summed field, only three numbers: the cell total and the two
largest per-person totals (a person's contribution is the sum of all their records in the cell).
The compiler computes them in SQL (see docs/disclosure.md); this module decides.

Comparisons are exact (numbers are converted to ``Fraction``), so the published boundaries
hold to the cent: *exactly* 90 % is not dominance, *exactly* p of the largest is not p %.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

import numpy as np

__all__ = [
    "DEFAULT_DOMINANCE_K",
    "DEFAULT_P_PERCENT",
    "CellContribution",
    "dominance_unsafe",
    "magnitude_sensitivity",
    "may_be_sensitive",
    "p_percent_unsafe",
]

Number = int | float | Decimal | Fraction

# Used when the grant sets no thresholds of its own (grant options dominance_k, p_percent).
DEFAULT_DOMINANCE_K = Decimal("0.90")
DEFAULT_P_PERCENT = Decimal("0.10")


def _exact(value: Number | None) -> Fraction:
    if value is None:
        return Fraction(0)
    if isinstance(value, float):
        # the float as written (0.9, 12.34), not its binary expansion
        return Fraction(Decimal(repr(value)))
    return Fraction(value)


@dataclass(frozen=True)
class CellContribution:
    """Per-cell input of the magnitude rules for one summed field.

    ``total``: sum of the field over the cell; ``top1`` / ``top2``: the largest and the
    second-largest per-person sums in the cell (``top2`` is 0 when only one person contributes).
    """

    total: Number | None
    top1: Number | None
    top2: Number | None = 0


def dominance_unsafe(c: CellContribution, *, k: Number = Fraction(9, 10)) -> bool:
    """(n=2, k) dominance: the two largest contributions make *more* than k of the total.

    >>> C = CellContribution
    >>> dominance_unsafe(C(100, 60, 31)), dominance_unsafe(C(100, 60, 30))
    (True, False)
    """
    total, top1, top2 = _exact(c.total), _exact(c.top1), _exact(c.top2)
    if total <= 0:
        # nothing (or only refunds) to hide; a positive top with a non-positive total is odd data
        return top1 > 0
    return top1 + top2 > _exact(k) * total


def p_percent_unsafe(c: CellContribution, *, p: Number = Fraction(1, 10)) -> bool:
    """p % rule: the second-largest contributor, subtracting their own value from the total,
    learns the largest to within p % when the rest (total − top1 − top2) is *below* p × top1.

    >>> C = CellContribution
    >>> p_percent_unsafe(C(120, 100, 11)), p_percent_unsafe(C(120, 100, 10))
    (True, False)
    """
    total, top1, top2 = _exact(c.total), _exact(c.top1), _exact(c.top2)
    if top1 <= 0:
        return False
    return total - top1 - top2 < _exact(p) * top1


# Relative margin of the float screen below: far above float64 error on sums of cents, far
# below any real difference between a cell's figures.
_SCREEN_MARGIN = 1e-9


def may_be_sensitive(
    total: Sequence[Number | None],
    top1: Sequence[Number | None],
    top2: Sequence[Number | None],
    *,
    k: Number = Fraction(9, 10),
    p: Number = Fraction(1, 10),
) -> list[bool]:
    """A vectorized screen for :func:`magnitude_sensitivity` over many cells: False only where
    a cell is safe under both rules with a margin; the exact rules decide the rest (so a large
    result does not pay for ``Fraction`` arithmetic on every cell).

    >>> may_be_sensitive([100, 100, 100], [60, 60, 50], [31, 30, 10])
    [True, True, False]
    """
    t = np.array([0.0 if v is None else float(v) for v in total])
    a = np.array([0.0 if v is None else float(v) for v in top1])
    b = np.array([0.0 if v is None else float(v) for v in top2])
    margin = _SCREEN_MARGIN * (np.abs(t) + np.abs(a) + np.abs(b) + 1.0)
    dominance = a + b > float(k) * t - margin
    p_rule = (a > -margin) & (t - a - b < float(p) * a + margin)
    return [bool(x) for x in (t <= margin) | dominance | p_rule]


def magnitude_sensitivity(
    c: CellContribution, *, k: Number = Fraction(9, 10), p: Number = Fraction(1, 10)
) -> str | None:
    """``"dominance"``, ``"p_percent"`` or ``None`` (safe); dominance is reported first."""
    if dominance_unsafe(c, k=k):
        return "dominance"
    if p_percent_unsafe(c, p=p):
        return "p_percent"
    return None
