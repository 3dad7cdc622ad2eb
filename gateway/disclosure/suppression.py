"""Disclosure control on an aggregate result: sensitive cells never leave as numbers.

Pure functions on plain rows. Rules, in order (docs/disclosure.md has the parameters and the
attacker model):

* **primary** — fewer distinct persons than the obligation's minimum: every measure withheld;
* **dominance** / **p_percent** — for sums and means, when the per-cell top contributions are
  supplied (``contribution_fields``): the cell's sum and mean measures are withheld, counts stay;
* **difference** — the cell's records differ from a cell released earlier (any insurer, same
  data version) by the records of 1 … k−1 persons (:mod:`.differencing`; the caller finds
  these and passes them as ``withheld``): every measure withheld;
* **secondary** — complementary suppression (:mod:`.complementary`), so that no withheld value
  can be recomputed or narrowed from the released cells and the line totals: every measure
  withheld.

A suppressed cell keeps its dimension values (the caller sees that it exists).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from gateway.disclosure.complementary import Table, complementary_suppression
from gateway.disclosure.rules import (
    CellContribution,
    Number,
    magnitude_sensitivity,
    may_be_sensitive,
)

__all__ = ["REASONS", "DisclosedResult", "SuppressedCell", "disclose", "magnitude_field"]

_CENT = Decimal("0.01")
REASONS = ("primary", "difference", "dominance", "p_percent", "secondary")


@dataclass(frozen=True)
class SuppressedCell:
    row: int
    reason: str  # one of REASONS
    measures: tuple[str, ...] = ()  # the withheld measures (all, unless dominance / p_percent)
    detail: str | None = None  # e.g. which earlier release a ``difference`` cell is close to

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"row": self.row, "reason": self.reason,
                                "measures": list(self.measures)}
        if self.detail is not None:
            body["detail"] = self.detail
        return body


@dataclass(frozen=True)
class DisclosedResult:
    columns: list[str]
    rows: list[list[Any]]
    suppressed: list[SuppressedCell]
    notes: list[str] = field(default_factory=list)

    @property
    def cells_released(self) -> int:
        """Rows whose every measure is released."""
        return len(self.rows) - len(self.suppressed)


def _release(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value.quantize(_CENT, rounding=ROUND_HALF_EVEN))
    if isinstance(value, float):
        return round(value, 2)
    return value


def magnitude_field(measure: str) -> str | None:
    """The summed field behind a measure alias (``sum_x`` / ``mean_x`` → ``x``), else None."""
    for prefix in ("sum_", "mean_"):
        if measure.startswith(prefix) and len(measure) > len(prefix):
            return measure[len(prefix) :]
    return None


def _number(value: Any) -> float:
    return 0.0 if value is None else float(value)


def disclose(
    dimensions: Sequence[str],
    measures: Sequence[str],
    raw_rows: Sequence[Sequence[Any]],
    *,
    min_cell_size: int,
    max_rows: int,
    contribution_fields: Sequence[str] = (),
    measure_fields: Mapping[str, str] | None = None,
    dominance_k: Number = Decimal("0.90"),
    p_percent: Number = Decimal("0.10"),
    secondary: bool = False,
    protection_ratio: float = 0.5,
    max_exact_cells: int | None = None,
    withheld: Mapping[int, tuple[str, str | None]] | None = None,
) -> DisclosedResult:
    """Apply primary, dominance, p % and complementary suppression, then the row limit.

    ``raw_rows`` hold the dimension values, then the distinct-person count, then the measures,
    then — for each field in ``contribution_fields`` — three numbers: the cell total of the
    field and the largest and second-largest per-person sums (docs/disclosure.md, SQL shape).
    ``measure_fields`` maps a sum/mean measure to its field (default: from the alias).

    ``withheld`` maps rows the caller already found sensitive (e.g. the difference check) to
    ``(reason, detail)``: they lose every measure and are protected like primary cells.

    ``secondary`` is off by default only so that existing callers keep their behaviour; the
    gateway must turn it on (docs/disclosure.md).

    >>> r = disclose(["gend"], ["count"], [("1", 12, 40), ("2", 3, 5)], min_cell_size=10,
    ...              max_rows=100)
    >>> r.rows, [(c.row, c.reason) for c in r.suppressed]
    ([['1', 40], ['2', None]], [(1, 'primary')])
    >>> r = disclose(["gend"], ["count"], [("1", 12, 40), ("2", 3, 5)], min_cell_size=10,
    ...              max_rows=100, secondary=True)
    >>> r.rows, [(c.row, c.reason) for c in r.suppressed]
    ([['1', None], ['2', None]], [(0, 'secondary'), (1, 'primary')])
    """
    if min_cell_size < 1:
        raise ValueError("min_cell_size must be at least 1")
    n_dims, n_measures = len(dimensions), len(measures)
    fields_of = dict(measure_fields) if measure_fields is not None else {}
    for m in measures:
        if m not in fields_of and (f := magnitude_field(m)) is not None:
            fields_of[m] = f
    magnitude = [i for i, m in enumerate(measures) if m in fields_of]
    counts = [i for i, m in enumerate(measures) if m not in fields_of]
    width = n_dims + 1 + n_measures + 3 * len(contribution_fields)

    if any(len(raw) != width for raw in raw_rows):
        raise ValueError("row shape does not match the query")
    n = len(raw_rows)
    # Column by column (one transposition, no object per cell): a large result has thousands
    # of rows.
    columns: list[tuple[Any, ...]] = list(zip(*raw_rows, strict=True)) if n else [()] * width
    keys: list[tuple[Any, ...]] = (list(zip(*columns[:n_dims], strict=True)) if n_dims
                                   else [()] * n)
    persons = [int(p or 0) for p in columns[n_dims]]
    values = columns[n_dims + 1 : n_dims + 1 + n_measures]  # values[i][r]: measure i, row r
    # (total, top1, top2) columns of each contribution field
    tops = [columns[n_dims + 1 + n_measures + 3 * j : n_dims + 4 + n_measures + 3 * j]
            for j in range(len(contribution_fields))]

    primary = {r for r in range(n) if persons[r] < min_cell_size}
    reasons: dict[int, str] = dict.fromkeys(primary, "primary")
    details: dict[int, str] = {}
    for r, (given, detail) in (withheld or {}).items():
        if r not in primary and 0 <= r < n:
            primary.add(r)  # protected like a primary cell from here on
            reasons[r] = given
            if detail is not None:
                details[r] = detail
    checked = {fields_of[measures[i]] for i in magnitude} & set(contribution_fields)
    if magnitude:
        # exact rules only where a float screen cannot rule the cell safe
        screened = [may_be_sensitive(*tops[j], k=dominance_k, p=p_percent)
                    for j in range(len(contribution_fields))]
        for r in range(n):
            if r in primary:
                continue
            for j in range(len(contribution_fields)):
                if not screened[j][r]:
                    continue
                cell = CellContribution(tops[j][0][r], tops[j][1][r], tops[j][2][r])
                why = magnitude_sensitivity(cell, k=dominance_k, p=p_percent)
                if why is not None:
                    reasons[r] = why
                    break
    magnitude_sensitive = {r for r, why in reasons.items() if why != "primary"}

    withhold_all = set(primary)
    unresolved: set[int] = set()
    exact = True
    if secondary and n > 1:
        table = Table(keys=keys, persons=persons)
        if counts:
            found = complementary_suppression(
                table, primary, [[_number(v) for v in values[i]] for i in counts],
                min_cell_size=min_cell_size, protection_ratio=protection_ratio,
                max_exact_cells=max_exact_cells,
            )
            exact = exact and found.exact
            withhold_all |= found.secondary
            unresolved |= found.unresolved
        if magnitude:
            series = [[_number(v) for v in values[i]] for i in magnitude]
            series += [[_number(v) for v in tops[j][0]] for j in range(len(contribution_fields))]
            found = complementary_suppression(
                table, primary | magnitude_sensitive, series, min_cell_size=min_cell_size,
                also_suppressed=withhold_all - primary, protection_ratio=protection_ratio,
                max_exact_cells=max_exact_cells,
            )
            exact = exact and found.exact
            withhold_all |= found.secondary
            unresolved |= found.unresolved
        for r in withhold_all - primary:
            reasons.setdefault(r, "secondary")

    rows: list[list[Any]] = []
    suppressed: list[SuppressedCell] = []
    by_row = list(zip(*values, strict=True)) if n_measures else [()] * n
    for r in range(n):
        if r in withhold_all:
            gone = set(range(n_measures))
        elif r in magnitude_sensitive:
            gone = set(magnitude)
        else:
            gone = set()
        rows.append([*keys[r], *(None if i in gone else _release(v)
                                 for i, v in enumerate(by_row[r]))])
        if gone:
            suppressed.append(SuppressedCell(
                row=r, reason=reasons[r], measures=tuple(measures[i] for i in sorted(gone)),
                detail=details.get(r),
            ))

    notes: list[str] = []
    unchecked = sorted({fields_of[measures[i]] for i in magnitude} - checked)
    if unchecked:
        notes.append(
            "dominance and p% rules not applied (no contributions supplied) for: "
            + ", ".join(unchecked)
        )
    if not exact:
        notes.append(
            f"complementary suppression used the line rule only (more than {max_exact_cells} "
            "cells): ask for fewer dimensions for the exact protection check"
        )
    if unresolved:
        notes.append(
            f"{len(unresolved)} suppressed cell(s) are narrowed by the line totals alone "
            "(other queries); no released value of this result narrows them further"
        )
    if len(rows) > max_rows:
        cut = len(rows) - max_rows
        rows = rows[:max_rows]
        suppressed = [c for c in suppressed if c.row < max_rows]
        notes.insert(0, f"result truncated to {max_rows} rows ({cut} more not returned)")
    if suppressed:
        tally = {why: sum(c.reason == why for c in suppressed) for why in REASONS}
        parts = [f"{k} {why}" for why, k in tally.items() if k]
        notes.append(
            f"{len(suppressed)} cell(s) suppressed: fewer than {min_cell_size} distinct persons "
            f"(primary), a few persons away from an earlier release (difference), top-2 "
            f"dominance over {dominance_k}, p% at {p_percent}, or to protect "
            f"those (secondary) — " + ", ".join(parts)
        )
    return DisclosedResult(
        columns=[*dimensions, *measures], rows=rows, suppressed=suppressed, notes=notes
    )
