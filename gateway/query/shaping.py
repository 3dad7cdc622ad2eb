"""HAVING, ORDER BY and LIMIT, applied to the released result only.

Applied to exact values inside SQL they would leak: a row that vanishes under
``HAVING SUM(x) > t`` tells the caller about a cell that disclosure control suppressed, and a
top-k on raw values ranks hidden cells. After disclosure they are post-processing of what was
released anyway, so they reveal nothing more. Suppressed values never satisfy a HAVING
condition and sort last.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from gateway.disclosure.suppression import DisclosedResult
from gateway.query.spec import Having, OrderItem

__all__ = ["shape"]

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq, "<>": operator.ne, "<": operator.lt, "<=": operator.le,
    ">": operator.gt, ">=": operator.ge,
}


def shape(
    result: DisclosedResult,
    *,
    having: Sequence[Having] | None,
    order_by: Sequence[OrderItem] | None,
    limit: int | None,
    column_of: Mapping[str, str] | None = None,
    hidden: int = 0,
) -> DisclosedResult:
    """Filter, sort and cut released rows; suppressed-cell indexes follow their rows; the last
    ``hidden`` columns (computed only to shape) are dropped.

    ``column_of`` maps a name used in HAVING or ORDER BY (alias or label) to its column.

    >>> from gateway.disclosure.suppression import disclose
    >>> r = disclose(["gend"], ["count"], [("1", 40, 40), ("2", 25, 25), ("9", 3, 3)],
    ...              min_cell_size=10, max_rows=100)
    >>> s = shape(r, having=[Having(measure="count", op=">", value=30)], order_by=None,
    ...           limit=None)
    >>> s.rows, s.suppressed
    ([['1', 40]], [])
    >>> s = shape(r, having=None, order_by=[OrderItem(column="count", desc=False)], limit=2)
    >>> s.rows, [c.row for c in s.suppressed]
    ([['2', 25], ['1', 40]], [])
    """
    if not having and not order_by and limit is None and not hidden:
        return result
    names = column_of or {}
    index = {name: i for i, name in enumerate(result.columns)}
    for name, column in names.items():
        index.setdefault(name, index[column])
    suppressed_rows = {c.row: c for c in result.suppressed}
    order = list(range(len(result.rows)))
    for cond in having or []:
        col, test, value = index[cond.measure], _OPS[cond.op], cond.value
        order = [i for i in order
                 if result.rows[i][col] is not None and test(result.rows[i][col], value)]
    for item in reversed(list(order_by or [])):  # stable sorts, last key first
        col = index[item.column]
        released = [i for i in order if result.rows[i][col] is not None]
        withheld = [i for i in order if result.rows[i][col] is None]
        values = {i: result.rows[i][col] for i in released}
        released.sort(key=values.__getitem__, reverse=item.desc)
        order = released + withheld  # suppressed values always last
    notes = list(result.notes)
    if limit is not None and len(order) > limit:
        notes.append(f"limited to {limit} rows")
        order = order[:limit]
    remap = {old: new for new, old in enumerate(order)}
    keep = len(result.columns) - hidden
    return replace(
        result,
        columns=result.columns[:keep],
        rows=[result.rows[i][:keep] for i in order],
        suppressed=[replace(suppressed_rows[i], row=remap[i]) for i in order
                    if i in suppressed_rows],
        notes=notes,
    )
