"""Disclosure control on an aggregate result: small cells never leave as numbers.

Pure functions on plain rows. A cell whose distinct-person count is below the obligation's
minimum keeps its dimension values (so the caller sees that it exists) and loses every measure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

__all__ = ["DisclosedResult", "SuppressedCell", "disclose"]

_CENT = Decimal("0.01")


@dataclass(frozen=True)
class SuppressedCell:
    row: int
    reason: str  # "primary" (too few persons); later "secondary", "dominance"

    def to_json(self) -> dict[str, Any]:
        return {"row": self.row, "reason": self.reason}


@dataclass(frozen=True)
class DisclosedResult:
    columns: list[str]
    rows: list[list[Any]]
    suppressed: list[SuppressedCell]
    notes: list[str] = field(default_factory=list)

    @property
    def cells_released(self) -> int:
        return len(self.rows) - len(self.suppressed)


def _release(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value.quantize(_CENT, rounding=ROUND_HALF_EVEN))
    if isinstance(value, float):
        return round(value, 2)
    return value


def disclose(
    dimensions: Sequence[str],
    measures: Sequence[str],
    raw_rows: Sequence[Sequence[Any]],
    *,
    min_cell_size: int,
    max_rows: int,
) -> DisclosedResult:
    """Apply primary suppression and the row limit.

    ``raw_rows`` hold the dimension values, then the distinct-person count, then the measures.

    >>> r = disclose(["gend"], ["count"], [("1", 12, 40), ("2", 3, 5)], min_cell_size=10,
    ...              max_rows=100)
    >>> r.rows, [c.to_json() for c in r.suppressed]
    ([['1', 40], ['2', None]], [{'row': 1, 'reason': 'primary'}])
    """
    if min_cell_size < 1:
        raise ValueError("min_cell_size must be at least 1")
    n_dims = len(dimensions)
    rows: list[list[Any]] = []
    suppressed: list[SuppressedCell] = []
    notes: list[str] = []
    for raw in raw_rows:
        if len(raw) != n_dims + 1 + len(measures):
            raise ValueError("row shape does not match the query")
        persons = int(raw[n_dims] or 0)
        dims = list(raw[:n_dims])
        if persons < min_cell_size:
            suppressed.append(SuppressedCell(row=len(rows), reason="primary"))
            rows.append([*dims, *([None] * len(measures))])
        else:
            rows.append([*dims, *(_release(v) for v in raw[n_dims + 1 :])])
    if len(rows) > max_rows:
        cut = len(rows) - max_rows
        rows = rows[:max_rows]
        suppressed = [c for c in suppressed if c.row < max_rows]
        notes.append(f"result truncated to {max_rows} rows ({cut} more not returned)")
    if suppressed:
        notes.append(
            f"{len(suppressed)} cell(s) suppressed: fewer than {min_cell_size} distinct persons"
        )
    return DisclosedResult(
        columns=[*dimensions, *measures], rows=rows, suppressed=suppressed, notes=notes
    )
