"""Disclosure control: primary, dominance, p %, complementary suppression.

The brute-force checker at the bottom is an attacker independent of the implementation: for
small random integer tables it enumerates *every* non-negative integer table consistent with
the released cells and the known line totals and reports each suppressed cell's feasible
interval. It proves, for those tables, that no sensitive cell is exactly recomputable or
narrowed below the protection range (width ≥ ratio × value) — unless the line totals alone,
with every cell of the result withheld, already narrow it that much (then this result adds
nothing). It does not prove anything about combining several results (differencing), nor about
tables larger than it enumerates.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest

from gateway.disclosure.complementary import Table, complementary_suppression, feasible_interval
from gateway.disclosure.rules import (
    CellContribution,
    dominance_unsafe,
    magnitude_sensitivity,
    p_percent_unsafe,
)
from gateway.disclosure.suppression import disclose

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "disclosure"
RATIO = 0.5


# -- dominance and p % ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("total", "top1", "top2", "unsafe"),
    [
        (100, 60, 30, False),  # exactly 90 %: not *more* than k
        (Decimal("100.00"), Decimal("60.00"), Decimal("30.01"), True),
        (Decimal("100.00"), Decimal("89.99"), Decimal("0"), False),
        (100, 91, 0, True),  # one person alone
        (0, 0, 0, False),
        (10.0, 9.0, 0.0, False),  # floats compared as written: 0.9 × 10.0 is exactly 9
    ],
)
def test_dominance_rule_boundary(total: Any, top1: Any, top2: Any, unsafe: bool) -> None:
    assert dominance_unsafe(CellContribution(total, top1, top2), k=Decimal("0.90")) is unsafe


@pytest.mark.parametrize(
    ("total", "top1", "top2", "unsafe"),
    [
        (Decimal("120"), Decimal("100"), Decimal("10"), False),  # rest exactly p × top1
        (Decimal("119.99"), Decimal("100"), Decimal("10"), True),
        (1000, 100, 10, False),
        (100, 0, 0, False),
        (0.3, 0.1, 0.1, False),  # rest 0.1 vs 0.01: float noise must not decide
    ],
)
def test_p_percent_rule_boundary(total: Any, top1: Any, top2: Any, unsafe: bool) -> None:
    assert p_percent_unsafe(CellContribution(total, top1, top2), p=Fraction(1, 10)) is unsafe


def test_magnitude_sensitivity_reports_dominance_before_p_percent() -> None:
    assert magnitude_sensitivity(CellContribution(100, 95, 1)) == "dominance"
    # with k = 0.90 and p = 0.10 every p % cell is also dominant (rest < 0.1·top1 ≤ 0.1·total),
    # so p % shows only with other parameters: 93 % is below k = 0.95, rest 70 < 0.1 × 900
    assert magnitude_sensitivity(CellContribution(1000, 900, 30)) == "dominance"
    assert magnitude_sensitivity(CellContribution(1000, 900, 30), k=Fraction(95, 100)) == (
        "p_percent")
    assert magnitude_sensitivity(CellContribution(1000, 300, 200)) is None


def test_p_percent_at_default_parameters_implies_dominance() -> None:
    rng = np.random.default_rng(3)
    for _ in range(2000):
        top1, top2, rest = (int(x) for x in rng.integers(0, 1000, 3))
        top2 = min(top1, top2)
        c = CellContribution(top1 + top2 + rest, top1, top2)
        assert not p_percent_unsafe(c) or dominance_unsafe(c)


def test_a_sum_dominated_by_one_huge_claim_loses_sum_and_mean_but_keeps_counts() -> None:
    rows = [
        ("1", 40, 40, Decimal("1000.00"), Decimal("25.00"), Decimal("1000.00"),
         Decimal("60.00"), Decimal("50.00")),
        ("2", 40, 40, Decimal("100000.00"), Decimal("2500.00"), Decimal("100000.00"),
         Decimal("95000.00"), Decimal("100.00")),
    ]
    result = disclose(["gend"], ["count", "sum_x", "mean_x"], rows, min_cell_size=10,
                      max_rows=10, contribution_fields=["x"])
    assert result.rows == [["1", 40, 1000.0, 25.0], ["2", 40, None, None]]
    [cell] = result.suppressed
    assert (cell.row, cell.reason, cell.measures) == (1, "dominance", ("sum_x", "mean_x"))
    assert result.cells_released == 1


def test_p_percent_cell_reported_as_p_percent() -> None:
    rows = [("1", 40, 1000, 1000, 900, 30), ("2", 40, 1000, 1000, 300, 200)]
    result = disclose(["k"], ["sum_x"], rows, min_cell_size=10, max_rows=10,
                      contribution_fields=["x"], dominance_k=Decimal("0.95"))
    assert [(c.row, c.reason) for c in result.suppressed] == [(0, "p_percent")]


def test_without_contributions_the_note_says_the_magnitude_rules_were_not_applied() -> None:
    result = disclose(["k"], ["sum_x"], [("1", 40, 5)], min_cell_size=10, max_rows=10)
    assert any("not applied" in note and "x" in note for note in result.notes)


# -- complementary suppression: hand-built regressions --------------------------------------
def _grid(values: list[list[int | None]]) -> list[tuple[Any, ...]]:
    """2-D table of person counts (None = absent cell) as raw rows (r, c, persons, count)."""
    return [(r, c, v, v) for r, line in enumerate(values) for c, v in enumerate(line)
            if v is not None]


def _suppressed(result: Any) -> dict[tuple[Any, ...], str]:
    return {tuple(result.rows[c.row][:-1]): c.reason for c in result.suppressed}


def test_single_suppressed_cell_in_a_row_cannot_be_recovered_from_the_row_total() -> None:
    rows = _grid([[3, 20, 30], [40, 50, 60]])
    result = disclose(["r", "c"], ["count_persons"], rows, min_cell_size=10, max_rows=100,
                      secondary=True)
    got = _suppressed(result)
    assert got[(0, 0)] == "primary"
    assert got[(0, 1)] == "secondary"  # smallest released cell of row 0
    assert got[(1, 0)] == "secondary"  # then column 0 had one suppressed cell
    assert got[(1, 1)] == "secondary"  # and then row 1
    assert len(got) == 4


def test_single_dimension_result_gets_the_smallest_other_cell_suppressed() -> None:
    rows = [(k, p, p) for k, p in [("a", 50, ), ("b", 3), ("c", 12), ("d", 12)]]
    result = disclose(["k"], ["count"], rows, min_cell_size=10, max_rows=100, secondary=True)
    assert [(c.row, c.reason) for c in result.suppressed] == [(1, "primary"), (2, "secondary")]


def test_no_dimension_total_is_only_primary_suppressed() -> None:
    result = disclose([], ["count"], [(4, 4)], min_cell_size=10, max_rows=10, secondary=True)
    assert [(c.row, c.reason) for c in result.suppressed] == [(0, "primary")]
    result = disclose([], ["count"], [(40, 40)], min_cell_size=10, max_rows=10, secondary=True)
    assert result.suppressed == []


def test_two_primary_cells_in_a_line_need_no_secondary_when_they_are_protected() -> None:
    rows = [(k, p, p) for k, p in [("a", 50), ("b", 4), ("c", 5)]]
    result = disclose(["k"], ["count"], rows, min_cell_size=10, max_rows=100, secondary=True)
    assert [c.reason for c in result.suppressed] == ["primary", "primary"]


def test_two_suppressed_cells_in_a_line_leave_the_larger_one_an_interval_of_its_size() -> None:
    # a=8, b=1, both primary; the attacker knows a + b = 9, so a ∈ [0, 9]: nothing to add
    rows = [(k, p, p) for k, p in [("a", 8), ("b", 1), ("c", 30), ("d", 40)]]
    result = disclose(["k"], ["count"], rows, min_cell_size=10, max_rows=100, secondary=True)
    assert [(c.row, c.reason) for c in result.suppressed] == [(0, "primary"), (1, "primary")]


def test_cycle_of_tiny_partners_is_widened_beyond_the_line_rule() -> None:
    # [[9, 8, 50], [1, 2, 60]], all four small cells primary, every line total known: each
    # line has two suppressed cells, yet a = 9 is pinned to [7, 10] by its small partners.
    rows = _grid([[9, 8, 50], [1, 2, 60]])
    keys = [tuple(r[:2]) for r in rows]
    values = [float(r[3]) for r in rows]
    table = Table(keys=keys, persons=[int(r[2]) for r in rows])
    sensitive = {0, 1, 3, 4}
    known = table.known_lines(sensitive, 10)
    lo, hi = feasible_interval(0, sensitive, known, values)
    assert lo == pytest.approx(7.0)
    assert hi == pytest.approx(10.0)
    result = disclose(["r", "c"], ["count"], rows, min_cell_size=10, max_rows=100,
                      secondary=True)
    hidden = {c.row for c in result.suppressed}
    assert {c.row for c in result.suppressed if c.reason == "secondary"}
    lo, hi = feasible_interval(0, hidden, known, values)
    assert hi - lo >= RATIO * 9


def test_bridge_between_two_suppression_cycles_is_not_left_exactly_determined() -> None:
    # Two 2×2 cycles joined by one cell: every line has ≥ 2 suppressed cells, yet the joining
    # cell equals (row residuals − column residuals) of one side. The line rule alone misses it.
    keys = [(r, c) for r in range(4) for c in range(4)]
    persons = [20 + 3 * i for i in range(16)]
    cycles = {(0, 0), (0, 1), (1, 0), (1, 1), (2, 2), (2, 3), (3, 2), (3, 3)}
    bridge = keys.index((1, 2))
    persons[bridge] = 4
    table = Table(keys=keys, persons=persons)
    pattern = {keys.index(k) for k in cycles}
    known = table.known_lines({bridge}, 10)
    lo, hi = feasible_interval(bridge, pattern | {bridge}, known, [float(p) for p in persons])
    assert hi - lo == pytest.approx(0.0, abs=1e-9)  # the trap is real
    found = complementary_suppression(table, {bridge}, [[float(p) for p in persons]],
                                      min_cell_size=10, also_suppressed=pattern)
    lo, hi = feasible_interval(bridge, pattern | {bridge} | set(found.secondary), known,
                               [float(p) for p in persons])
    assert hi - lo >= RATIO * 4
    assert not found.unresolved


def test_cell_alone_in_its_line_is_not_a_useful_complement() -> None:
    # (2, 0) is the only cell of row 2: its value is published by the coarser query by row,
    # so suppressing it protects nothing; column 0 must take another cell.
    rows = _grid([[3, 25, None], [30, 40, 50], [11, None, None]])
    result = disclose(["r", "c"], ["count"], rows, min_cell_size=10, max_rows=100,
                      secondary=True)
    got = _suppressed(result)
    assert (2, 0) not in got
    assert got[(1, 0)] == "secondary"


def test_dominance_cell_keeps_counts_but_its_sum_is_complemented() -> None:
    # 1-D; cell b dominated: sum withheld; line total of the sum is known → one more sum goes
    rows = [
        ("a", 40, 40, 5000, 5000, 300, 200),
        ("b", 40, 40, 9000, 9000, 8000, 500),
        ("c", 35, 35, 4000, 4000, 300, 250),
    ]
    result = disclose(["k"], ["count", "sum_x"], rows, min_cell_size=10, max_rows=10,
                      contribution_fields=["x"], secondary=True)
    assert [(c.row, c.reason, c.measures) for c in result.suppressed] == [
        (1, "dominance", ("sum_x",)), (2, "secondary", ("count", "sum_x"))]
    assert result.rows == [["a", 40, 5000], ["b", 40, None], ["c", None, None]]


def test_secondary_is_deterministic_and_independent_of_row_order_of_equal_cells() -> None:
    rows = _grid([[3, 20, 20], [20, 20, 20]])
    first = disclose(["r", "c"], ["count"], rows, min_cell_size=10, max_rows=100,
                     secondary=True)
    again = disclose(["r", "c"], ["count"], rows, min_cell_size=10, max_rows=100,
                     secondary=True)
    assert first == again
    assert _suppressed(first) == {(0, 0): "primary", (0, 1): "secondary",
                                  (1, 0): "secondary", (1, 1): "secondary"}


def test_row_limit_applies_after_suppression() -> None:
    rows = [(str(i), 50 if i else 3, 1) for i in range(5)]
    result = disclose(["k"], ["count"], rows, min_cell_size=10, max_rows=3, secondary=True)
    assert len(result.rows) == 3
    assert "truncated" in result.notes[0]
    assert all(c.row < 3 for c in result.suppressed)


# -- test vectors --------------------------------------------------------------------------
def _vector_files() -> list[Path]:
    return sorted(VECTORS.glob("*.json"))


@pytest.mark.parametrize("path", _vector_files(), ids=lambda p: p.stem)
def test_vector(path: Path) -> None:
    v = json.loads(path.read_text())
    result = disclose(
        v["dimensions"], v["measures"], [tuple(r) for r in v["rows"]],
        min_cell_size=v["min_cell_size"], max_rows=1000,
        contribution_fields=v.get("contribution_fields", []), secondary=True,
    )
    got = [{"row": c.row, "reason": c.reason} for c in result.suppressed]
    assert got == v["expected_suppressed"], v["description"]


def test_there_are_vectors() -> None:
    assert len(_vector_files()) >= 4


# -- brute-force attacker ------------------------------------------------------------------
def _lines(keys: list[tuple[int, ...]]) -> list[list[int]]:
    out: list[list[int]] = []
    for dim in range(len(keys[0])):
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, key in enumerate(keys):
            groups[key[:dim] + key[dim + 1 :]].append(i)
        out.extend(groups.values())
    return out


def _attacker_intervals(
    keys: list[tuple[int, ...]], values: list[int], persons: list[int], hidden: set[int],
    sensitive: set[int], m: int,
) -> dict[int, tuple[float, float]]:
    """Enumerate all integer tables ≥ 0 consistent with released cells and known totals."""
    known = [line for line in _lines(keys)
             if sum(persons[i] for i in line) >= m
             and not (len(line) == 1 and line[0] in sensitive)]
    order = sorted(hidden)
    residual = [sum(values[i] for i in line if i in hidden) for line in known]
    lines_of = {i: [j for j, line in enumerate(known) if i in line] for i in order}
    last_of: dict[int, list[int]] = defaultdict(list)
    for j, line in enumerate(known):
        inside = [i for i in order if i in line]
        if inside:
            last_of[max(inside, key=order.index)].append(j)
    lo = {i: float("inf") for i in order}
    hi = {i: float("-inf") for i in order}
    unbounded = {i for i in order if not lines_of[i]}
    assignment: dict[int, int] = {}

    def walk(pos: int) -> None:
        if pos == len(order):
            for i, x in assignment.items():
                lo[i] = min(lo[i], x)
                hi[i] = max(hi[i], x)
            return
        cell = order[pos]
        cap = min((residual[j] for j in lines_of[cell]), default=0)
        for x in range(cap + 1):
            for j in lines_of[cell]:
                residual[j] -= x
            if all(residual[j] == 0 for j in last_of[cell]):
                assignment[cell] = x
                walk(pos + 1)
            for j in lines_of[cell]:
                residual[j] += x
        assignment.pop(cell, None)

    walk(0)
    for i in unbounded:
        hi[i] = float("inf")
    return {i: (lo[i], hi[i]) for i in order}


def _random_table(rng: np.random.Generator, shape: tuple[int, ...]) -> list[tuple[Any, ...]]:
    rows = []
    for key in itertools.product(*[range(s) for s in shape]):
        if rng.random() < 0.1:
            continue  # an absent combination: a structural zero
        v = int(rng.integers(1, 13))
        rows.append((*key, v, v))
    return rows


@pytest.mark.parametrize("seed", range(40))
def test_brute_force_attacker_cannot_narrow_any_sensitive_cell(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shapes = [(2, 2), (2, 3), (3, 3), (3, 4), (4, 4), (3, 3, 2)]
    shape = shapes[seed % len(shapes)]
    raw = _random_table(rng, shape)
    if len(raw) < 2:
        return
    m = 5
    k = len(shape)
    result = disclose([f"d{i}" for i in range(k)], ["count"], raw, min_cell_size=m,
                      max_rows=1000, secondary=True)
    keys = [tuple(r[:k]) for r in raw]
    values = [int(r[k + 1]) for r in raw]
    persons = [int(r[k]) for r in raw]
    hidden = {c.row for c in result.suppressed}
    sensitive = {c.row for c in result.suppressed if c.reason == "primary"}
    assert sensitive == {i for i, p in enumerate(persons) if p < m}
    intervals = _attacker_intervals(keys, values, persons, hidden, sensitive, m)
    baseline: dict[int, tuple[float, float]] | None = None
    for cell in sensitive:
        lo, hi = intervals[cell]
        assert lo <= values[cell] <= hi
        if hi - lo > 0 and hi - lo >= RATIO * values[cell]:
            continue
        if baseline is None:  # what the line totals alone allow, with nothing released
            baseline = _attacker_intervals(keys, values, persons, set(range(len(keys))),
                                           sensitive, m)
        b_lo, b_hi = baseline[cell]
        assert hi - lo >= min(b_hi - b_lo, RATIO * values[cell]), (
            f"cell {keys[cell]}={values[cell]} narrowed to [{lo}, {hi}] by the released cells"
        )


def test_brute_force_checker_catches_the_naive_pattern() -> None:
    """The checker is not vacuous: primary suppression alone leaves cells recoverable."""
    raw = _grid([[3, 20, 30], [40, 50, 60]])
    keys = [tuple(r[:2]) for r in raw]
    values = [int(r[3]) for r in raw]
    intervals = _attacker_intervals(keys, values, values, {0}, {0}, 10)
    assert intervals[0] == (3, 3)


# -- the SQL shape the compiler should add ---------------------------------------------------
SQL_SHAPE = """
WITH per_person AS (
    SELECT gend, psn_id, COUNT(*) AS _rows, SUM(amt) AS _sum_amt, COUNT(amt) AS _cnt_amt
    FROM claims WHERE year IN (2024)
    GROUP BY gend, psn_id
)
SELECT gend,
       COUNT(*) AS _n_persons,
       SUM(_rows) AS count,
       SUM(_sum_amt) AS sum_amt,
       SUM(_sum_amt) / SUM(_cnt_amt) AS mean_amt,
       SUM(_sum_amt) AS _total_amt,
       MAX(_sum_amt) AS _top1_amt,
       COALESCE(MAX(_sum_amt, 2)[2], 0) AS _top2_amt
FROM per_person
GROUP BY gend
ORDER BY gend
"""


def test_documented_sql_shape_yields_totals_and_top_two_per_person_sums() -> None:
    rng = np.random.default_rng(7)
    con = duckdb.connect()
    con.execute("CREATE TABLE claims (gend VARCHAR, psn_id INTEGER, year INTEGER, "
                "amt DECIMAL(18, 2))")
    data = [(str(rng.integers(1, 3)), int(rng.integers(0, 30)), 2024,
             Decimal(int(rng.integers(0, 100000))) / 100) for _ in range(300)]
    data.append(("1", 999, 2024, Decimal("50000.00")))
    con.executemany("INSERT INTO claims VALUES (?, ?, ?, ?)", data)
    got = con.execute(SQL_SHAPE).fetchall()
    plain = con.execute("SELECT gend, COUNT(DISTINCT psn_id), COUNT(*), SUM(amt), AVG(amt) "
                        "FROM claims WHERE year IN (2024) GROUP BY gend ORDER BY gend").fetchall()
    per: dict[str, dict[int, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    for g, p, _, a in data:
        per[g][p] += a
    for row, want in zip(got, plain, strict=True):
        assert row[:4] == want[:4]
        assert float(row[4]) == pytest.approx(float(want[4]))
        tops = sorted(per[row[0]].values(), reverse=True)
        assert (row[5], row[6], row[7]) == (sum(tops), tops[0], tops[1])
    result = disclose(["gend"], ["count", "sum_amt", "mean_amt"], got, min_cell_size=5,
                      max_rows=10, contribution_fields=["amt"])
    assert len(result.rows) == len(got)
