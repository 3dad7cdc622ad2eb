"""Difference check across requests: no released cell may differ from another by a few persons.

Two cells of the same data version whose record sets differ only by the records of 1 … k−1
persons give away those persons' values by subtraction (a *tracker*:
``SUM(… WHERE region IN (R03, R07))`` − ``SUM(… WHERE region IN (R03))`` when R07 holds one
person). Whoever asked the first cell — this insurer or another one, who may collude — the
second is suppressed, with reason ``difference`` (docs/disclosure.md).

What a cell covers is its *box*: the query's filters and the cell's own group values, one value
set per dimension (a dimension not mentioned is unrestricted). The data version is immutable, so
the box alone fixes the records, and the exact check is one DuckDB scan:

    persons with a record in (R ∧ ¬N) ∨ (N ∧ ¬R)

counted per candidate pair. A person whose records differ between the two cells is counted even
when they are in both (the sum still moves by their amount), so this is at least the person-set
difference. Candidates are cheap to find without touching data: a small difference needs
``|n_R − n_N| ≤ k − 1`` (persons in one cell and not the other are a subset of the difference),
identical boxes differ by nobody, and disjoint boxes differ by everybody in either cell.
Only candidate pairs cost a scan, all of them in one statement.

Pure core (boxes, candidates, the SQL tree); the gateway runs the statement and keeps the
released cells in the state store (:mod:`gateway.state.budgets`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlglot import exp

from gateway.catalog import Dataset, FieldType

__all__ = [
    "NULL_VALUE",
    "Box",
    "BoxIndex",
    "Domains",
    "Pair",
    "ReleasedCell",
    "box_key",
    "box_of_cell",
    "box_predicate",
    "boxes_of_cells",
    "candidate_pairs",
    "difference_sql",
    "normalize",
    "one_dimension_difference",
    "persons_sql",
    "small_differences",
]

# A NULL group value: no catalog value can be spelled like this.
NULL_VALUE = "\x00null"
# Candidate pairs per statement (one COUNT(DISTINCT …) column each).
MAX_PAIRS_PER_STATEMENT = 48

#: One value set per restricted dimension, sorted by dimension; values as strings.
Box = tuple[tuple[str, tuple[str, ...]], ...]


def _text(value: Any) -> str:
    return NULL_VALUE if value is None else str(value)


def box_of_cell(
    filters: Mapping[str, Sequence[Any]], dimensions: Sequence[str], key: Sequence[Any]
) -> Box:
    """What one cell covers: the filters, narrowed by the cell's group values.

    >>> box_of_cell({"year": [2024, 2023]}, ["gend"], ["1"])
    (('gend', ('1',)), ('year', ('2023', '2024')))
    >>> box_of_cell({"gend": ["1", "2"]}, ["gend"], ["2"])
    (('gend', ('2',)),)
    """
    sets: dict[str, set[str]] = {d: {_text(v) for v in vs} for d, vs in filters.items()}
    for d, value in zip(dimensions, key, strict=True):
        own = {_text(value)}
        sets[d] = sets[d] & own if d in sets else own
    return tuple((d, tuple(sorted(sets[d]))) for d in sorted(sets))


def boxes_of_cells(
    filters: Mapping[str, Sequence[Any]], dimensions: Sequence[str],
    keys: Sequence[Sequence[Any]], domains: Domains,
) -> list[Box]:
    """``[normalize(box_of_cell(filters, dimensions, key), domains) for key in keys]``, each
    dimension's part worked out once per distinct value (a large result repeats few values).

    >>> boxes_of_cells({"year": [2024]}, ["gend"], [["1"], ["2"]],
    ...                {"gend": frozenset({"1", "2"}), "year": frozenset({"2023", "2024"})})
    [(('gend', ('1',)), ('year', ('2024',))), (('gend', ('2',)), ('year', ('2024',)))]
    """
    names = sorted(set(filters) | set(dimensions))
    column = {d: i for i, d in enumerate(dimensions)}
    allowed = {d: {_text(v) for v in vs} for d, vs in filters.items()}

    def part(d: str, values: set[str]) -> tuple[str, tuple[str, ...]] | None:
        normalized = normalize(((d, tuple(sorted(values))),), domains)
        return normalized[0] if normalized else None

    fixed = {d: part(d, allowed[d]) for d in names if d not in column}
    seen: dict[str, dict[str, tuple[str, tuple[str, ...]] | None]] = {d: {} for d in column}
    out: list[Box] = []
    for key in keys:
        if len(key) != len(dimensions):
            raise ValueError("a cell key does not match the dimensions")
        box: list[tuple[str, tuple[str, ...]]] = []
        for d in names:
            i = column.get(d)
            if i is None:
                found = fixed[d]
            else:
                value = _text(key[i])
                cache = seen[d]
                if value in cache:
                    found = cache[value]
                else:
                    own = {value} & allowed[d] if d in allowed else {value}
                    found = cache[value] = part(d, own)
            if found is not None:
                box.append(found)
        out.append(tuple(box))
    return out


def box_key(dataset: str, box: Box) -> str:
    """A stable name of a box (hex SHA-256 of its canonical JSON)."""
    text = json.dumps([dataset, [[d, list(vs)] for d, vs in box]], separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ReleasedCell:
    """A cell some earlier response released (what it covered, never its values)."""

    box: Box
    n_persons: int
    release_id: str
    org: str | None = None


@dataclass(frozen=True)
class Pair:
    row: int  # the new cell
    earlier: ReleasedCell


def candidate_pairs(
    new_cells: Iterable[tuple[int, Box, int]],
    released: Sequence[ReleasedCell],
    *,
    k: int,
) -> list[Pair]:
    """Pairs (new cell, released cell) that *may* differ by 1 … k−1 persons.

    ``new_cells`` are ``(row, box, n_persons)``; ``released`` is sorted by ``n_persons``.
    Not candidates: identical boxes (same records), disjoint boxes when either cell has ≥ k
    persons (everyone in both differs), and cells whose person counts differ by k or more.

    >>> R = ReleasedCell((("year", ("2024",)),), 100, "rel-1")
    >>> [p.row for p in candidate_pairs([(0, (("year", ("2023", "2024")),), 101)], [R], k=10)]
    [0]
    >>> candidate_pairs([(0, (("year", ("2023",)),), 101)], [R], k=10)
    []
    """
    if k < 2:
        return []
    counts = [c.n_persons for c in released]
    found: list[Pair] = []
    for row, box, n in new_cells:
        lo = _bisect_left(counts, n - (k - 1))
        hi = _bisect_right(counts, n + (k - 1))
        sets = {d: frozenset(vs) for d, vs in box}  # once per new cell, not per pair
        for cell in released[lo:hi]:
            other = cell.box
            if other == box:
                continue
            if n >= k or cell.n_persons >= k:
                for d, vs in other:
                    mine = sets.get(d)
                    if mine is not None and mine.isdisjoint(vs):
                        break  # disjoint boxes: everyone in either cell differs
                else:
                    found.append(Pair(row, cell))
                continue
            found.append(Pair(row, cell))
    return found


def _bisect_left(values: Sequence[int], x: int) -> int:
    lo, hi = 0, len(values)
    while lo < hi:
        mid = (lo + hi) // 2
        if values[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _bisect_right(values: Sequence[int], x: int) -> int:
    lo, hi = 0, len(values)
    while lo < hi:
        mid = (lo + hi) // 2
        if values[mid] <= x:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _literal(dataset: Dataset, name: str, value: str) -> exp.Expr:
    if dataset.dimensions[name].type is FieldType.INTEGER:
        return exp.Literal.number(int(value))
    return exp.Literal.string(value)


def box_predicate(box: Box, dataset: Dataset) -> exp.Expr:
    """The box as a WHERE condition that is never NULL (so ``NOT`` of it is exact).

    >>> from gateway.catalog import default_catalog
    >>> ds = default_catalog().datasets["settlements"]
    >>> box_predicate((("gend", ("1",)), ("year", ("2024",))), ds).sql("duckdb")
    "COALESCE(gend IN ('1') AND year IN (2024), FALSE)"
    """
    parts: list[exp.Expr] = []
    for name, values in box:
        column = exp.column(name)
        real = [v for v in values if v != NULL_VALUE]
        tests: list[exp.Expr] = []
        if real:
            tests.append(exp.In(this=column.copy(),
                                expressions=[_literal(dataset, name, v) for v in real]))
        if len(real) != len(values):
            tests.append(exp.Is(this=column.copy(), expression=exp.Null()))
        if not tests:  # no value the data holds: no record
            parts.append(exp.false())
            continue
        parts.append(tests[0] if len(tests) == 1 else exp.or_(*tests))
    if not parts:
        return exp.true()
    return exp.Coalesce(this=exp.and_(*parts), expressions=[exp.false()])


def _difference(a: Box, b: Box, dataset: Dataset) -> exp.Expr:
    """Records in exactly one of the two boxes; constraints both share are factored out so
    DuckDB can push them into the scan."""
    shared = tuple(item for item in a if item in b)
    only_a = tuple(item for item in a if item not in shared)
    only_b = tuple(item for item in b if item not in shared)
    pa, pb = box_predicate(only_a, dataset), box_predicate(only_b, dataset)
    either = exp.or_(
        exp.and_(pa.copy(), exp.Not(this=pb.copy())), exp.and_(pb.copy(), exp.Not(this=pa.copy()))
    )
    if not shared:
        return either
    return exp.and_(box_predicate(shared, dataset), exp.paren(either))


def difference_sql(
    pairs: Sequence[tuple[Box, Box]], dataset: Dataset
) -> exp.Select:
    """One scan counting, per pair, the distinct persons with a record in exactly one box.

    >>> from gateway.catalog import default_catalog
    >>> ds = default_catalog().datasets["settlements"]
    >>> a = (("insu_admdvs", ("420102",)),)
    >>> b = (("insu_admdvs", ("420102", "420103")),)
    >>> print(difference_sql([(a, b)], ds).sql("duckdb"))  # doctest: +NORMALIZE_WHITESPACE
    SELECT COUNT(DISTINCT CASE WHEN (COALESCE(insu_admdvs IN ('420102'), FALSE)
      AND NOT COALESCE(insu_admdvs IN ('420102', '420103'), FALSE))
      OR (COALESCE(insu_admdvs IN ('420102', '420103'), FALSE)
      AND NOT COALESCE(insu_admdvs IN ('420102'), FALSE)) THEN psn_id END) AS d0
    FROM settlements WHERE (COALESCE(insu_admdvs IN ('420102'), FALSE)
      AND NOT COALESCE(insu_admdvs IN ('420102', '420103'), FALSE))
      OR (COALESCE(insu_admdvs IN ('420102', '420103'), FALSE)
      AND NOT COALESCE(insu_admdvs IN ('420102'), FALSE))
    """
    person = exp.column(dataset.person_key)
    conditions = [_difference(a, b, dataset) for a, b in pairs]
    columns = [
        exp.Count(this=exp.Distinct(expressions=[
            exp.Case(ifs=[exp.If(this=c.copy(), true=person.copy())])
        ])).as_(f"d{i}")
        for i, c in enumerate(conditions)
    ]
    return exp.select(*columns).from_(exp.to_table(dataset.table)).where(
        exp.or_(*[c.copy() for c in conditions]) if len(conditions) > 1 else conditions[0]
    )


def persons_sql(boxes: Sequence[Box], dataset: Dataset) -> exp.Select:
    """One scan counting the distinct persons of each box."""
    person = exp.column(dataset.person_key)
    conditions = [box_predicate(b, dataset) for b in boxes]
    return exp.select(*[
        exp.Count(this=exp.Distinct(expressions=[
            exp.Case(ifs=[exp.If(this=c.copy(), true=person.copy())])
        ])).as_(f"n{i}")
        for i, c in enumerate(conditions)
    ]).from_(exp.to_table(dataset.table)).where(
        exp.or_(*[c.copy() for c in conditions]) if len(conditions) > 1 else conditions[0]
    )


def small_differences(pairs: Sequence[Pair], counts: Sequence[int], *, k: int) -> dict[int, Pair]:
    """New rows to suppress: the first pair (in the order given) whose difference is 1 … k−1.

    >>> R = ReleasedCell((), 50, "rel-1")
    >>> small_differences([Pair(0, R), Pair(1, R)], [0, 3], k=10)
    {1: Pair(row=1, earlier=ReleasedCell(box=(), n_persons=50, release_id='rel-1', org=None))}
    """
    hits: dict[int, Pair] = {}
    for pair, persons in zip(pairs, counts, strict=True):
        if 1 <= persons <= k - 1:
            hits.setdefault(pair.row, pair)
    return hits


# -- derived boxes: inclusion–exclusion across releases ------------------------------------
#
# Pairs are not enough. With every margin large, four answers
#   all − (county ≠ c) − (age ≠ a) + (county ≠ c ∧ age ≠ a)
# give the small (county c, age a) group, although no two of them differ by few persons.
# Whenever two known boxes differ in one dimension only, with one value set inside the other,
# their difference is itself a box the attacker knows ((county ≠ c ∧ age = a) above); it is
# derived, checked like a new cell, and remembered. The closure over one-dimension
# differences turns every such inclusion–exclusion into a pair that the check sees.

#: Dimension -> every value the data version holds (complements are taken within it).
Domains = Mapping[str, frozenset[str]]


def normalize(box: Box, domains: Domains) -> Box:
    """Drop values the data does not hold, and dimensions restricted to all their values
    (``gend IN ('1', '2')`` covers what no filter covers).

    >>> normalize((("gend", ("1", "2")), ("year", ("2024", "1999"))),
    ...           {"gend": frozenset({"1", "2"}), "year": frozenset({"2023", "2024"})})
    (('year', ('2024',)),)
    """
    out: list[tuple[str, tuple[str, ...]]] = []
    for d, values in box:
        domain = domains.get(d)
        if domain is None:
            out.append((d, values))
            continue
        kept = tuple(v for v in values if v in domain)
        if set(kept) != domain:
            out.append((d, kept))
    return tuple(out)


def _without(box: Box, d: str) -> Box:
    return tuple(item for item in box if item[0] != d)


def _with(box: Box, d: str, values: frozenset[str]) -> Box:
    return tuple(sorted([*_without(box, d), (d, tuple(sorted(values)))]))


def one_dimension_difference(a: Box, b: Box, domains: Domains) -> Box | None:
    """The box ``larger − smaller`` when ``a`` and ``b`` agree on every dimension but one and
    along it one value set holds the other; else None.

    >>> dom = {"gend": frozenset({"1", "2"}), "age_band": frozenset({"x", "y", "z"})}
    >>> one_dimension_difference((("gend", ("1",)),), (), dom)
    (('gend', ('2',)),)
    >>> one_dimension_difference((("age_band", ("x", "y")), ("gend", ("1",))),
    ...                          (("age_band", ("x",)), ("gend", ("1",))), dom)
    (('age_band', ('y',)), ('gend', ('1',)))
    >>> one_dimension_difference((("gend", ("1",)),), (("age_band", ("x",)),), dom) is None
    True
    """
    in_a, in_b = dict(a), dict(b)
    differing: tuple[str, frozenset[str] | None, frozenset[str] | None] | None = None
    for d in in_a.keys() | in_b.keys():
        x, y = in_a.get(d), in_b.get(d)
        if x == y:  # the same value tuple: the same set
            continue
        vx = domains.get(d) if x is None else frozenset(x)
        vy = domains.get(d) if y is None else frozenset(y)
        if vx == vy:
            continue
        if differing is not None:
            return None  # a second differing dimension
        differing = (d, vx, vy)
    if differing is None:
        return None
    d, va, vb = differing
    if va is None or vb is None:
        return None  # an open dimension without a known domain: no complement
    if vb < va:
        return normalize(_with(a, d, va - vb), domains)
    if va < vb:
        return normalize(_with(b, d, vb - va), domains)
    return None


class BoxIndex:
    """Known boxes of one data version and dataset, found by their one-dimension neighbours."""

    def __init__(self) -> None:
        self._all: set[Box] = set()
        self._by_rest: dict[Box, set[Box]] = {}  # box minus one of its dimensions -> boxes

    def __contains__(self, box: object) -> bool:
        return box in self._all

    def __len__(self) -> int:
        return len(self._all)

    def add(self, box: Box) -> None:
        if box in self._all:
            return
        self._all.add(box)
        for d, _ in box:
            self._by_rest.setdefault(_without(box, d), set()).add(box)

    def neighbours(self, box: Box) -> set[Box]:
        """Known boxes that may differ from ``box`` in exactly one dimension."""
        found: set[Box] = set(self._by_rest.get(box, ()))  # restrict one more dimension
        for d, _ in box:
            rest = _without(box, d)
            found |= self._by_rest.get(rest, set())  # restrict d otherwise
            if rest in self._all:
                found.add(rest)  # leave d open
        found.discard(box)
        return found
