"""The compiler's per-person top-2 contributions (dominance / p% inputs) and the line rule at
scale: compiled SQL run on DuckDB against a literal Python computation; the incremental line
rule against the plain sweep loop it replaces."""

from __future__ import annotations

import random
from collections import defaultdict
from decimal import Decimal
from typing import Any

import duckdb
import pytest

from gateway.catalog import default_catalog
from gateway.disclosure.complementary import Table, complementary_suppression
from gateway.disclosure.suppression import disclose
from gateway.errors import QueryRejected
from gateway.query.compiler import compile_aggregate
from gateway.query.spec import AggregateQuery

CATALOG = default_catalog()


def _settlements(rows: list[tuple[Any, ...]]) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("CREATE TABLE settlements (psn_id BIGINT, gend VARCHAR, hosp_lv VARCHAR, "
                "year BIGINT, psn_part_amt DECIMAL(18,2), medfee_sumamt DECIMAL(18,2))")
    con.executemany("INSERT INTO settlements VALUES (?, ?, ?, ?, ?, ?)", rows)
    return con


def _random_rows(seed: int) -> list[tuple[Any, ...]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(600):
        person = rng.randrange(60)
        amount = None if rng.random() < 0.1 else Decimal(rng.randrange(0, 500_000)) / 100
        fee = Decimal(rng.randrange(-5_000, 900_000)) / 100  # refunds are negative
        # a person's many settlements fall in the same cell often: they must add up
        rows.append((person, "12"[person % 2], rng.choice(["1", "2", "3"]), 2024, amount, fee))
    return rows


def _query(**over: Any) -> AggregateQuery:
    body: dict[str, Any] = {
        "purpose": "hmb_pricing", "dataset": "settlements", "dimensions": ["gend", "hosp_lv"],
        "measures": [{"fn": "count_persons"}, {"fn": "count"},
                     {"fn": "sum", "field": "psn_part_amt"},
                     {"fn": "mean", "field": "psn_part_amt"},
                     {"fn": "mean", "field": "medfee_sumamt"}],
        "filters": {"year": [2024]},
    }
    return AggregateQuery.model_validate({**body, **over})


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_top_two_are_per_person_sums_and_measures_equal_the_plain_sql(seed: int) -> None:
    rows = _random_rows(seed)
    con = _settlements(rows)
    compiled = compile_aggregate(_query(), CATALOG)
    plain = compile_aggregate(_query(), CATALOG, contributions=False)
    assert compiled.contribution_fields == ("psn_part_amt", "medfee_sumamt")
    assert "_per_person" in compiled.sql
    assert "_per_person" not in plain.sql
    got = con.execute(compiled.sql).fetchall()
    want = con.execute(plain.sql).fetchall()
    per_person: dict[tuple[str, str], dict[str, dict[int, Decimal]]] = defaultdict(
        lambda: {"psn_part_amt": defaultdict(Decimal), "medfee_sumamt": defaultdict(Decimal)})
    for person, gend, hosp, _, amount, fee in rows:
        cell = per_person[(gend, hosp)]
        if amount is not None:
            cell["psn_part_amt"][person] += amount
        cell["medfee_sumamt"][person] += fee
    assert len(got) == len(want) == len(per_person)
    for row, plain_row in zip(got, want, strict=True):
        # dims, persons, count_persons, count, sum: exactly the plain SQL; means to the last
        # bits of a double
        assert row[:6] == plain_row[:6]
        assert float(row[6]) == pytest.approx(float(plain_row[6]), rel=1e-12)
        assert float(row[7]) == pytest.approx(float(plain_row[7]), rel=1e-12)
        for j, name in enumerate(compiled.contribution_fields):
            sums = sorted(per_person[(row[0], row[1])][name].values(), reverse=True)
            total, top1, top2 = row[8 + 3 * j: 11 + 3 * j]
            assert (total, top1, top2) == (sum(sums), sums[0], sums[1] if len(sums) > 1 else 0)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_64_bit_per_person_sums_give_the_same_rows_as_the_generic_statement(seed: int) -> None:
    con = _settlements(_random_rows(seed))
    types = dict(con.execute("SELECT column_name, data_type FROM information_schema.columns "
                             "WHERE table_name = 'settlements'").fetchall())
    typed = compile_aggregate(_query(), CATALOG, column_types=types)
    generic = compile_aggregate(_query(), CATALOG)
    assert "DECIMAL(18, 2)" in typed.sql
    assert "DECIMAL(18, 2)" not in generic.sql
    assert con.execute(typed.sql).fetchall() == con.execute(generic.sql).fetchall()


def test_a_per_person_sum_too_large_for_64_bits_fails_the_query_never_rounds() -> None:
    con = _settlements([(1, "1", "1", 2024, Decimal("9999999999999999.99"), Decimal(1)),
                        (1, "1", "1", 2024, Decimal("0.01"), Decimal(1))])
    typed = compile_aggregate(_query(), CATALOG,
                              column_types={"psn_part_amt": "DECIMAL(18,2)",
                                            "medfee_sumamt": "DECIMAL(18,2)"})
    with pytest.raises(duckdb.ConversionException):
        con.execute(typed.sql).fetchall()


def test_one_persons_many_settlements_dominate_together_not_alone() -> None:
    # 12 persons of 20 元 each; person 99 has ten settlements of 500 元: no single settlement
    # dominates (500 of 5,240), the person's 5,000 元 does.
    rows: list[tuple[Any, ...]] = [(p, "1", "1", 2024, Decimal(20), Decimal(100))
                                   for p in range(12)]
    rows += [(99, "1", "1", 2024, Decimal(500), Decimal(100)) for _ in range(10)]
    con = _settlements(rows)
    compiled = compile_aggregate(_query(dimensions=["gend"]), CATALOG)
    raw = con.execute(compiled.sql).fetchall()
    assert raw[0][7:10] == (Decimal(5240), Decimal(5000), Decimal(20))
    result = disclose(compiled.dimensions, compiled.measures, raw, min_cell_size=10,
                      max_rows=100, contribution_fields=compiled.contribution_fields,
                      measure_fields=compiled.measure_fields, secondary=True)
    assert [(c.reason, c.measures) for c in result.suppressed] == [
        ("dominance", ("sum_psn_part_amt", "mean_psn_part_amt", "mean_medfee_sumamt"))]
    assert result.rows[0][:3] == ["1", 13, 22]  # counts stay
    assert not any("not applied" in note for note in result.notes)


def test_count_only_queries_keep_the_single_stage_statement() -> None:
    compiled = compile_aggregate(_query(measures=[{"fn": "count_persons"}, {"fn": "count"}]),
                                 CATALOG)
    assert compiled.contribution_fields == ()
    assert "_per_person" not in compiled.sql
    assert "DISTINCT" in compiled.sql


def test_a_hidden_sum_for_having_gets_its_contributions_too() -> None:
    query = _query(measures=[{"fn": "count"}],
                   having=[{"measure": "sum_psn_part_amt", "op": ">", "value": 0}])
    compiled = compile_aggregate(query, CATALOG)
    assert compiled.hidden == 1
    assert compiled.contribution_fields == ("psn_part_amt",)
    assert compiled.measure_fields == {"sum_psn_part_amt": "psn_part_amt"}


def test_labels_map_to_their_fields_and_cannot_pose_as_another_sum() -> None:
    labelled = compile_aggregate(_query(measures=[
        {"fn": "sum", "field": "psn_part_amt", "label": "burden"}]), CATALOG)
    assert labelled.measure_fields == {"burden": "psn_part_amt"}
    with pytest.raises(QueryRejected):
        compile_aggregate(_query(measures=[{"fn": "count", "label": "sum_medfee_sumamt"}]),
                          CATALOG)


# -- the line rule at scale ------------------------------------------------------------------

def _sweeps(table: Table, sensitive: set[int], min_cell_size: int) -> set[int]:
    """The line rule as first written: sweep every known line until nothing changes."""
    known = table.known_lines(sensitive, min_cell_size)
    exposed = {line[0] for line in known if len(line) == 1}
    pattern = set(sensitive)
    changed = True
    while changed:
        changed = False
        for line in known:
            inside = [r for r in line if r in pattern]
            outside = [r for r in line if r not in pattern]
            if len(inside) == 1 and outside:
                pattern.add(min(outside, key=lambda r: (r in exposed, table.persons[r], r)))
                changed = True
    return pattern - sensitive


def _big_table(seed: int) -> tuple[Table, set[int]]:
    rng = random.Random(seed)
    keys, persons = [], []
    for a in range(14):
        for b in range(12):
            for c in range(11):
                if rng.random() < 0.9:  # absent combinations are structural zeros
                    keys.append((f"a{a}", b, f"c{c}"))
                    persons.append(rng.choice([1, 3, 8, 12, 30, 80, 200, 1000]))
    return Table(keys=keys, persons=persons), {i for i, p in enumerate(persons) if p < 10}


@pytest.mark.parametrize("seed", [5, 6])
def test_big_table_no_suppressed_cell_is_alone_in_a_known_line(seed: int) -> None:
    table, sensitive = _big_table(seed)
    assert len(table.keys) > 1_000
    found = complementary_suppression(table, sensitive, [[float(p) for p in table.persons]],
                                      min_cell_size=10, max_exact_cells=300)
    assert not found.exact  # beyond the exact check: the line rule alone protects
    pattern = sensitive | found.secondary
    for line in table.known_lines(sensitive, 10):
        hidden = [r for r in line if r in pattern]
        assert len(hidden) != 1, (line, hidden)
    # the worklist gives the same pattern as the plain sweeps it replaces
    assert found.secondary == _sweeps(table, sensitive, 10)


def test_person_years_by_year_needs_no_per_person_stage() -> None:
    # One row per person and year: with the year a dimension (or one year selected) each row
    # of a cell is a person, so the rows are the per-person sums.
    rng = random.Random(3)
    con = duckdb.connect()
    con.execute("CREATE TABLE person_years (psn_id BIGINT, year BIGINT, gend VARCHAR, "
                "psn_part_amt DECIMAL(18,2))")
    rows = [(p, y, "12"[p % 2], Decimal(rng.randrange(0, 900_000)) / 100)
            for p in range(30) for y in (2023, 2024)]
    con.executemany("INSERT INTO person_years VALUES (?, ?, ?, ?)", rows)
    body = {"dataset": "person_years",
            "measures": [{"fn": "count_persons"}, {"fn": "sum", "field": "psn_part_amt"}]}
    by_year = compile_aggregate(_query(**body, dimensions=["gend", "year"], filters={}),
                                CATALOG)
    over_years = compile_aggregate(_query(**body, dimensions=["gend"], filters={}), CATALOG)
    assert "_per_person" not in by_year.sql
    assert "_per_person" in over_years.sql  # a person's two years add up
    for compiled, key in ((by_year, lambda r: (r[2], r[1])), (over_years, lambda r: (r[2],))):
        per_person: dict[tuple[Any, ...], dict[int, Decimal]] = defaultdict(
            lambda: defaultdict(Decimal))
        for r in rows:
            per_person[key(r)][r[0]] += r[3]
        for got in con.execute(compiled.sql).fetchall():
            sums = sorted(per_person[tuple(got[:len(compiled.dimensions)])].values(),
                          reverse=True)
            n = len(compiled.dimensions)
            assert got[n:] == (len(sums), len(sums), sum(sums), sum(sums), sums[0], sums[1])
