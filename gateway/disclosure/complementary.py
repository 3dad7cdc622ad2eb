"""Complementary (secondary) cell suppression within one aggregate result.

The result is a k-dimensional table over its grouping dimensions; only the cells present in
the result exist (an absent combination is a structural zero the attacker also knows).

Attacker model (see docs/disclosure.md): the attacker sees every released cell of this result
and knows the total of every *line* — all cells that share all dimension values but one —
because they can ask the coarser grouping in another query; with no better knowledge, values
are only known to be ≥ 0. Two line totals are excepted, because the coarser query withholds
them for the same reason: a line whose person counts sum to fewer than the minimum (its total
has fewer distinct persons still), and a line holding a single, sensitive cell (the coarser
cell is the same persons and records, so it is sensitive too).

Protection: for every sensitive cell and every additive value series (person counts, counts,
sums), the interval of values consistent with the attacker's knowledge — ``[min, max]`` of a
linear program — must be at least ``protection_ratio`` × the cell's value wide and never a
single point. Cells are added in two steps, repeated until nothing changes:

1. the line rule: a known line holding exactly one suppressed cell gets a second one, the
   released cell with the fewest persons (ties: earlier row), avoiding cells already published
   through a line of their own;
2. the audit: each sensitive cell's interval is computed by the simplex in :mod:`.lp`; a cell
   still too narrow gets the candidate cell (same lines as its group of suppressed cells) that
   protects it, fewest persons first, or else the one that widens it most.

If no released cell is left that could widen a cell's interval, what remains is what the line
totals alone reveal; this result adds nothing to it (reported in ``unresolved``).
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from gateway.disclosure.lp import FeasibleRegion

__all__ = [
    "MAX_EXACT_CELLS",
    "Protection",
    "Table",
    "complementary_suppression",
    "feasible_interval",
]

_REL_TOL = 1e-7
_MAX_TRIALS = 64


# Above this many cells the exact interval check is too slow for a request (its linear
# programs grow with the table); callers then get the line rule only.
MAX_EXACT_CELLS = 300


@dataclass(frozen=True)
class Table:
    """The cells of one result: their dimension keys and distinct-person counts."""

    keys: Sequence[tuple[Hashable, ...]]
    persons: Sequence[int]

    def lines(self) -> list[list[int]]:
        """Every 1-D line (cells sharing all dimension values but one), as row indexes.

        Dimension by dimension, lines in order of their first row, rows ascending.

        >>> Table(keys=[("a", 1), ("a", 2), ("b", 1)], persons=[1, 1, 1]).lines()
        [[0, 2], [1], [0, 1], [2]]
        """
        return [list(line) for line in self._lines]

    @cached_property
    def _lines(self) -> list[list[int]]:
        # Computed once per result: counts and sums are protected on the same table.
        if not self.keys:
            return []
        k = len(self.keys[0])
        found: list[list[int]] = []
        for dim in range(k):
            groups: dict[tuple[Hashable, ...], list[int]] = defaultdict(list)
            for row, key in enumerate(self.keys):
                groups[key[:dim] + key[dim + 1 :]].append(row)
            found.extend(groups.values())
        return found

    @cached_property
    def _line_persons(self) -> list[int]:
        # Person counts summed per line, once per result (both series ask).
        persons = self.persons
        return [sum(persons[r] for r in line) for line in self._lines]

    def known_lines(self, sensitive: Iterable[int], min_cell_size: int) -> list[list[int]]:
        """The lines whose totals the attacker is assumed to know (see the module text)."""
        sensitive = set(sensitive)
        known = []
        for line, total in zip(self._lines, self._line_persons, strict=True):
            if len(line) == 1:
                # one cell: its line total is its person count
                if line[0] in sensitive or total < min_cell_size:
                    continue
            elif total < min_cell_size:
                continue
            known.append(line)
        return known


@dataclass(frozen=True)
class Protection:
    secondary: frozenset[int]
    unresolved: frozenset[int]  # sensitive cells whose interval the line totals alone narrow
    exact: bool = True  # False when the table was too large for the interval check


def _component(start: int, pattern: set[int], lines_of: dict[int, list[list[int]]]) -> list[int]:
    seen = {start}
    todo = [start]
    while todo:
        cell = todo.pop()
        for line in lines_of.get(cell, []):
            for other in line:
                if other in pattern and other not in seen:
                    seen.add(other)
                    todo.append(other)
    return sorted(seen)


class _LineRule:
    """The line rule, incrementally: a known line holding exactly one suppressed cell gets a
    second one. Only lines touched by a new suppression are looked at again (a worklist over
    per-line counts of suppressed cells), in the order of repeated sweeps over the lines — the
    pattern is the one the plain "sweep until nothing changes" loop gives, in time linear in
    the cells touched rather than sweeps × lines."""

    def __init__(
        self,
        known: Sequence[Sequence[int]],
        pattern: set[int],
        order: Callable[[int], tuple[bool, int, int]],
    ) -> None:
        self.known = known
        self.pattern = pattern
        self.order = order
        self.line_ids: dict[int, list[int]] = defaultdict(list)
        for i, line in enumerate(known):
            for r in line:
                self.line_ids[r].append(i)
        self.inside = [len(pattern.intersection(line)) for line in known]
        self.pending = [i for i, n in enumerate(self.inside) if n == 1 and len(known[i]) > 1]
        heapq.heapify(self.pending)

    def add(self, cell: int) -> None:
        """Suppress one more cell (from the audit) and queue the lines it touches."""
        self.pattern.add(cell)
        for i in self.line_ids.get(cell, []):
            self.inside[i] += 1
            if self.inside[i] == 1 and len(self.known[i]) > 1:
                heapq.heappush(self.pending, i)

    def run(self) -> None:
        """Sweep until no known line holds exactly one suppressed cell."""
        while self.pending:  # one sweep per pass
            current, self.pending = self.pending, []
            while current:
                i = heapq.heappop(current)
                if self.inside[i] != 1:
                    continue
                chosen = min((r for r in self.known[i] if r not in self.pattern),
                             key=self.order)
                self.pattern.add(chosen)
                for j in self.line_ids.get(chosen, []):
                    self.inside[j] += 1
                    if self.inside[j] == 1 and len(self.known[j]) > 1:
                        # a later line is met in this sweep, an earlier one in the next
                        heapq.heappush(current if j > i else self.pending, j)


def feasible_interval(
    cell: int,
    pattern: set[int],
    known_lines: Sequence[Sequence[int]],
    values: Sequence[float],
) -> tuple[float, float]:
    """``[min, max]`` of a suppressed cell's value given the released cells and line totals."""
    lines_of: dict[int, list[list[int]]] = defaultdict(list)
    for line in known_lines:
        for r in line:
            lines_of[r].append(list(line))
    comp = _component(cell, pattern, lines_of)
    index = {r: i for i, r in enumerate(comp)}
    rows: list[list[int]] = []
    seen_lines: set[tuple[int, ...]] = set()
    for r in comp:
        for line in lines_of.get(r, []):
            inside = tuple(sorted(index[x] for x in line if x in index))
            if inside not in seen_lines:
                seen_lines.add(inside)
                rows.append(list(inside))
    v = np.array([float(values[r]) for r in comp])
    if not rows:
        return (0.0 if v.min() >= 0 else -np.inf), np.inf
    scale = max(float(np.abs(v).max()), 1.0)
    lower = 0.0 if v.min() >= 0 else -float(np.abs(v).sum()) / scale - 1.0
    y = v / scale - lower
    a = np.zeros((len(rows), len(comp)))
    for i, members in enumerate(rows):
        a[i, members] = 1.0
    region = FeasibleRegion(a, a @ y)
    c = np.zeros(len(comp))
    c[index[cell]] = 1.0
    hi = region.maximize(c)
    lo = -region.maximize(-c)
    return (lo + lower) * scale, (hi + lower) * scale


def _protected(
    cell: int, interval: tuple[float, float], values: Sequence[float], ratio: float
) -> bool:
    value = abs(float(values[cell]))
    width = interval[1] - interval[0]
    return width >= ratio * value - _REL_TOL * max(value, 1.0) and width > _REL_TOL * max(
        value, 1.0
    )


def complementary_suppression(
    table: Table,
    sensitive: Iterable[int],
    series: Sequence[Sequence[float]],
    *,
    min_cell_size: int,
    also_suppressed: Iterable[int] = (),
    protection_ratio: float = 0.5,
    max_exact_cells: int | None = None,
) -> Protection:
    """Cells to suppress in addition to ``sensitive`` (and ``also_suppressed``, already withheld
    but not themselves in need of protection) so that every sensitive cell stays protected in
    every value series.

    The exact interval check costs linear programs per sensitive cell; on a table of more than
    ``max_exact_cells`` cells only the line rule runs (``Protection.exact`` is then False)."""
    sensitive = set(sensitive)
    pattern = sensitive | set(also_suppressed)
    known = table.known_lines(sensitive, min_cell_size)
    lines_of: dict[int, list[list[int]]] = defaultdict(list)  # filled for the exact check
    exposed = {line[0] for line in known if len(line) == 1}

    def order(r: int) -> tuple[bool, int, int]:
        return (r in exposed, table.persons[r], r)

    unresolved: set[int] = set()
    exact = True
    lines = _LineRule(known, pattern, order)
    while True:
        lines.run()
        if max_exact_cells is not None and len(table.persons) > max_exact_cells:
            exact = False
            break
        if not lines_of:
            for line in known:
                for r in line:
                    lines_of[r].append(line)
        failing: tuple[int, Sequence[float], float] | None = None
        for cell in sorted(sensitive - unresolved):
            for values in series:
                interval = feasible_interval(cell, pattern, known, values)
                if not _protected(cell, interval, values, protection_ratio):
                    failing = (cell, values, interval[1] - interval[0])
                    break
            if failing is not None:
                break
        if failing is None:
            break
        cell, values, width = failing
        comp = _component(cell, pattern, lines_of)
        candidates = sorted(
            {r for c in comp for line in lines_of.get(c, []) for r in line if r not in pattern},
            key=order,
        )
        if not candidates:
            unresolved.add(cell)
            continue
        chosen: int | None = None
        best = (width, candidates[0])
        for r in candidates[:_MAX_TRIALS]:
            trial = feasible_interval(cell, pattern | {r}, known, values)
            if _protected(cell, trial, values, protection_ratio):
                chosen = r
                break
            if trial[1] - trial[0] > best[0] + _REL_TOL:
                best = (trial[1] - trial[0], r)
        lines.add(best[1] if chosen is None else chosen)
    unresolved = {
        cell
        for cell in unresolved
        if exact and not all(
            _protected(cell, feasible_interval(cell, pattern, known, v), v, protection_ratio)
            for v in series
        )
    }
    return Protection(
        secondary=frozenset(pattern - sensitive - set(also_suppressed)),
        unresolved=frozenset(unresolved),
        exact=exact,
    )
