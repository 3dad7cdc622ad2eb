"""SQL for analysts: the accepted subset reads into the same AggregateQuery as JSON, and its
compiled SQL returns what the asker's own SQL returns on DuckDB; every refused construct is
named in the message, which never repeats a value the asker wrote."""

from __future__ import annotations

import random
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest

from gateway.catalog import default_catalog
from gateway.disclosure.suppression import disclose
from gateway.errors import QueryRejected
from gateway.query.compiler import compile_aggregate
from gateway.query.shaping import shape
from gateway.query.spec import AggregateQuery
from gateway.query.sql import identifier_names, parse_sql

CATALOG = default_catalog()
PURPOSE = "hmb_pricing"
# Literals planted in the refused statements: they must never come back in a message.
SECRET_TEXT = "ZX91"
SECRET_NUMBER = "987654"


@pytest.fixture(scope="module")
def con() -> duckdb.DuckDBPyConnection:
    rng = random.Random(20261122)
    con = duckdb.connect()
    con.execute("SET threads = 1")
    con.execute(
        "CREATE TABLE settlements (psn_id BIGINT, age_band VARCHAR, gend VARCHAR,"
        " insu_admdvs VARCHAR, insutype VARCHAR, year BIGINT, med_type VARCHAR,"
        " hosp_lv VARCHAR, medfee_sumamt DECIMAL(18,2), hifp_pay DECIMAL(18,2),"
        " psn_part_amt DECIMAL(18,2))"
    )
    people = [
        (pid, rng.choice(["18-29", "30-39", "60-69", "80+"]), rng.choice("12"),
         rng.choice(["420100", "420500"]), rng.choice(["310", "390"]))
        for pid in range(1, 81)
    ]
    rows = []
    for _ in range(600):
        pid, band, gend, admdvs, insutype = rng.choice(people)
        fee = Decimal(rng.randint(100, 900_000)) / 100
        hifp = (fee * Decimal(rng.randint(30, 80)) / 100).quantize(Decimal("0.01"))
        rows.append((pid, band, gend, admdvs, insutype, rng.choice([2023, 2024]),
                     rng.choice(["11", "14", "21", "41"]), rng.choice("1239"),
                     fee, hifp, fee - hifp))
    con.executemany("INSERT INTO settlements VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
    return con


def _spec(**body: Any) -> AggregateQuery:
    return AggregateQuery.model_validate({"purpose": PURPOSE, "dataset": "settlements", **body})


def _norm(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    # Released amounts are rounded to the cent; compare at that precision.
    return [tuple(round(float(v), 2) if isinstance(v, float | Decimal) else v for v in r)
            for r in rows]


# (the asker's SQL, the AggregateQuery it must read into, whether its ORDER BY is total)
ACCEPTED: list[tuple[str, AggregateQuery, bool]] = [
    (
        "SELECT gend, COUNT(*) FROM settlements GROUP BY gend",
        _spec(dimensions=["gend"], measures=[{"fn": "count"}]),
        False,
    ),
    (
        "select age_band, gend, count_persons(), sum(medfee_sumamt), avg(hifp_pay)"
        " from settlements where year = 2024 and med_type in ('21', '14')"
        " group by gend, age_band",
        _spec(dimensions=["age_band", "gend"],
              measures=[{"fn": "count_persons"}, {"fn": "sum", "field": "medfee_sumamt"},
                        {"fn": "mean", "field": "hifp_pay"}],
              filters={"year": [2024], "med_type": ["21", "14"]}),
        False,
    ),
    (  # the canonical alias is no label; another alias is kept as the output name
        "SELECT s.insu_admdvs AS insu_admdvs, SUM(psn_part_amt) AS sum_psn_part_amt,"
        " COUNT(*) AS claims FROM settlements AS s WHERE (s.insutype = '390')"
        " GROUP BY 1",
        _spec(dimensions=["insu_admdvs"],
              measures=[{"fn": "sum", "field": "psn_part_amt"},
                        {"fn": "count", "label": "claims"}],
              filters={"insutype": ["390"]}),
        False,
    ),
    (  # pricing: burden per age band, big cells only, largest first
        "SELECT age_band, count_persons() AS persons, SUM(psn_part_amt) AS burden"
        " FROM settlements WHERE year IN (2023, 2024) GROUP BY age_band"
        " HAVING count_persons() >= 5 AND SUM(psn_part_amt) > 1000.5"
        " ORDER BY burden DESC LIMIT 3",
        _spec(dimensions=["age_band"],
              measures=[{"fn": "count_persons", "label": "persons"},
                        {"fn": "sum", "field": "psn_part_amt", "label": "burden"}],
              filters={"year": [2023, 2024]},
              having=[{"measure": "count_persons", "op": ">=", "value": 5},
                      {"measure": "sum_psn_part_amt", "op": ">", "value": 1000.5}],
              order_by=[{"column": "sum_psn_part_amt", "desc": True}], limit=3),
        True,
    ),
    (  # HAVING on an aggregate not selected, literal first; ORDER BY an aggregate and ordinal
        "SELECT hosp_lv, med_type, AVG(medfee_sumamt) FROM settlements"
        " GROUP BY hosp_lv, med_type HAVING 3 < COUNT(*)"
        " ORDER BY AVG(medfee_sumamt) DESC, 1 LIMIT 10000",
        _spec(dimensions=["hosp_lv", "med_type"],
              measures=[{"fn": "mean", "field": "medfee_sumamt"}],
              having=[{"measure": "count", "op": ">", "value": 3}],
              order_by=[{"column": "mean_medfee_sumamt", "desc": True},
                        {"column": "hosp_lv"}],
              limit=10000),
        True,
    ),
    (  # no dimensions: one total row; mean() as a spelling of AVG
        "SELECT count_persons(), COUNT(*), MEAN(hifp_pay) AS avg_fund FROM settlements"
        " WHERE gend = '2'",
        _spec(measures=[{"fn": "count_persons"}, {"fn": "count"},
                        {"fn": "mean", "field": "hifp_pay", "label": "avg_fund"}],
              filters={"gend": ["2"]}),
        True,
    ),
    (  # HAVING on an output name; ORDER BY dimension ascending; negative literal
        "SELECT year, SUM(hifp_pay) AS fund FROM settlements WHERE hosp_lv = '3'"
        " GROUP BY year HAVING fund <> -1 ORDER BY year",
        _spec(dimensions=["year"],
              measures=[{"fn": "sum", "field": "hifp_pay", "label": "fund"}],
              filters={"hosp_lv": ["3"]},
              having=[{"measure": "sum_hifp_pay", "op": "<>", "value": -1}],
              order_by=[{"column": "year"}]),
        True,
    ),
]


@pytest.mark.parametrize(("sql", "expected", "ordered"), ACCEPTED)
def test_accepted_sql_reads_into_the_json_plan_and_returns_the_same_rows(
    con: duckdb.DuckDBPyConnection, sql: str, expected: AggregateQuery, ordered: bool
) -> None:
    query = parse_sql(sql, purpose=PURPOSE, catalog=CATALOG)
    assert query == expected
    compiled = compile_aggregate(query, CATALOG)
    # The gateway's path: compiled SQL, disclosure (no cell small enough to hide here), then
    # HAVING / ORDER BY / LIMIT on the released values.
    released = disclose(compiled.dimensions, compiled.measures,
                        con.execute(compiled.sql).fetchall(), min_cell_size=1, max_rows=10_000,
                        contribution_fields=compiled.contribution_fields,
                        measure_fields=compiled.measure_fields, dominance_k=1, p_percent=0)
    shaped = shape(released, having=query.having, order_by=query.order_by, limit=query.limit,
                   column_of=compiled.column_of, hidden=compiled.hidden)
    got = [tuple(r) for r in shaped.rows]
    # The asker's own SQL, run as written, with count_persons() spelled out by hand.
    original = re.sub(r"count_persons\(\)", "COUNT(DISTINCT psn_id)", sql, flags=re.I)
    want = con.execute(original).fetchall()
    assert got, "the case should return rows"
    if ordered:
        assert _norm(got) == _norm(want)
    else:
        assert sorted(_norm(got), key=repr) == sorted(_norm(want), key=repr)


def test_output_columns_use_the_askers_names_and_keep_sql_canonical() -> None:
    query = parse_sql(ACCEPTED[3][0], purpose=PURPOSE, catalog=CATALOG)
    compiled = compile_aggregate(query, CATALOG)
    assert compiled.measures == ("persons", "burden")
    assert "burden" not in compiled.sql  # labels never enter the SQL
    assert query.fields() == ["age_band", "psn_part_amt", "year"]


def test_having_on_an_unselected_measure_touches_its_field() -> None:
    query = parse_sql(
        "SELECT gend, COUNT(*) FROM settlements GROUP BY gend HAVING SUM(hifp_pay) > 0",
        purpose=PURPOSE, catalog=CATALOG)
    assert "hifp_pay" in query.fields()
    assert "hifp_pay" in query.policy_resource()["fields"]


def test_measures_are_output_after_the_dimensions(con: duckdb.DuckDBPyConnection) -> None:
    sql = "SELECT COUNT(*) AS n, gend FROM settlements GROUP BY gend ORDER BY gend"
    query = parse_sql(sql, purpose=PURPOSE, catalog=CATALOG)
    assert query == _spec(dimensions=["gend"], measures=[{"fn": "count", "label": "n"}],
                          order_by=[{"column": "gend"}])
    got = [(r[0], r[2]) for r in con.execute(compile_aggregate(query, CATALOG).sql).fetchall()]
    assert got == [(g, n) for n, g in con.execute(sql).fetchall()]


def test_json_queries_without_the_new_members_are_unchanged() -> None:
    query = _spec(dimensions=["gend"], measures=[{"fn": "count"}])
    assert set(query.model_dump(exclude_none=True)) == {
        "purpose", "dataset", "dimensions", "measures", "filters"}
    assert compile_aggregate(query, CATALOG).sql == (
        "SELECT gend, COUNT(DISTINCT psn_id) AS _n_persons, COUNT(*) AS count FROM settlements"
        " GROUP BY gend ORDER BY gend"
    )


def test_json_limit_is_capped() -> None:
    with pytest.raises(ValueError, match="limit"):
        _spec(measures=[{"fn": "count"}], limit=10001)


def test_every_source_identifier_is_refused_by_name() -> None:
    assert identifier_names(CATALOG) >= {
        "psn_id", "psn_no", "certno", "psn_name", "tel", "addr", "setl_id", "mdtrt_id"}
    for name in sorted(identifier_names(CATALOG)):
        sql = "SELECT gend, COUNT(*) FROM settlements WHERE psn_no <> 987654 GROUP BY gend"
        sql = sql.replace("psn_no", name)
        with pytest.raises(QueryRejected) as info:
            parse_sql(sql, purpose=PURPOSE, catalog=CATALOG)
        assert f"{name} is an identifier" in info.value.message
        assert SECRET_NUMBER not in info.value.message


REFUSED: list[tuple[str, str]] = [
    # identifiers, anywhere
    ("SELECT gend, COUNT(*) FROM settlements WHERE psn_no <> 987654 GROUP BY gend",
     "psn_no is an identifier"),
    ("SELECT gend, COUNT(*) FROM settlements WHERE psn_no <> 0 AND gend = 'ZX91' GROUP BY gend",
     "psn_no is an identifier"),
    ("SELECT psn_id, COUNT(*) FROM settlements GROUP BY psn_id", "psn_id is an identifier"),
    ("SELECT psn_id FROM settlements", "psn_id is an identifier"),
    ("SELECT gend, COUNT(DISTINCT psn_id) FROM settlements GROUP BY gend",
     "psn_id is an identifier"),
    ("SELECT gend, COUNT(*) FROM settlements WHERE certno = 'ZX91' GROUP BY gend",
     "certno is an identifier"),
    ("SELECT gend, SUM(medfee_sumamt) AS tel FROM settlements GROUP BY gend",
     "tel is an identifier"),
    # row-level selects
    ("SELECT * FROM settlements", "SELECT *"),
    ("SELECT * FROM settlements WHERE gend = 'ZX91'", "SELECT *"),
    ("SELECT medfee_sumamt FROM settlements", "row-level select"),
    ("SELECT gend FROM settlements", "row-level select"),
    ("SELECT gend, year, COUNT(*) FROM settlements GROUP BY gend", "GROUP BY"),
    ("SELECT gend, COUNT(*) FROM settlements", "GROUP BY"),
    ("SELECT DISTINCT gend, COUNT(*) FROM settlements GROUP BY gend", "SELECT DISTINCT"),
    # statements, CTEs, set operations, subqueries, windows, joins
    ("WITH x AS (SELECT gend FROM settlements WHERE gend = 'ZX91') SELECT gend, COUNT(*)"
     " FROM x GROUP BY gend", "WITH"),
    ("SELECT gend, COUNT(*) FROM settlements GROUP BY gend UNION SELECT gend, COUNT(*)"
     " FROM settlements WHERE gend = 'ZX91' GROUP BY gend", "UNION"),
    ("SELECT gend, COUNT(*) FROM settlements GROUP BY gend INTERSECT SELECT gend, COUNT(*)"
     " FROM settlements GROUP BY gend", "INTERSECT"),
    ("SELECT gend, COUNT(*) FROM settlements GROUP BY gend EXCEPT SELECT gend, COUNT(*)"
     " FROM settlements GROUP BY gend", "EXCEPT"),
    ("SELECT gend, COUNT(*) FROM settlements WHERE gend = 'ZX91' GROUP BY gend;"
     " DROP TABLE settlements", "multiple statements"),
    ("DROP TABLE settlements", "only a single SELECT"),
    ("SELECT gend, SUM(medfee_sumamt) OVER () FROM settlements WHERE gend = 'ZX91'", "OVER"),
    ("SELECT gend, COUNT(*) FROM settlements WHERE gend IN (SELECT gend FROM settlements"
     " WHERE med_type = 'ZX91') GROUP BY gend", "subquer"),
    ("SELECT gend, COUNT(*) FROM (SELECT * FROM settlements) GROUP BY gend", "subquer"),
    ("SELECT gend, COUNT(*) FROM settlements WHERE EXISTS (SELECT 1 WHERE 1 = 987654)"
     " GROUP BY gend", "subquer"),
    ("SELECT s.gend, COUNT(*) FROM settlements s JOIN person_years p ON s.gend = p.gend"
     " WHERE s.gend = 'ZX91' GROUP BY s.gend", "JOIN"),
    ("SELECT gend, COUNT(*) FROM settlements, person_years GROUP BY gend", "JOIN"),
    # functions
    ("SELECT gend, MAX(medfee_sumamt) FROM settlements GROUP BY gend",
     "MAX is not allowed: it is one person's value"),
    ("SELECT gend, MIN(medfee_sumamt) FROM settlements GROUP BY gend",
     "MIN is not allowed: it is one person's value"),
    ("SELECT gend, MEDIAN(medfee_sumamt) FROM settlements GROUP BY gend", "MEDIAN"),
    ("SELECT gend, COUNT(*), random() FROM settlements GROUP BY gend", "function RANDOM"),
    ("SELECT gend, COUNT(*) FROM settlements WHERE lower(gend) = 'ZX91' GROUP BY gend",
     "function LOWER"),
    ("SELECT gend, my_udf(medfee_sumamt, 'ZX91') FROM settlements GROUP BY gend",
     "function MY_UDF"),
    ("SELECT gend, SUM(medfee_sumamt * 987654) FROM settlements GROUP BY gend", "arithmetic (*)"),
    ("SELECT CAST(year AS VARCHAR), COUNT(*) FROM settlements WHERE gend = 'ZX91'"
     " GROUP BY 1", "function CAST"),
    ("SELECT gend, COUNT(DISTINCT gend) FROM settlements GROUP BY gend", "DISTINCT"),
    ("SELECT gend, COUNT(medfee_sumamt) FROM settlements GROUP BY gend", "COUNT takes only *"),
    ("SELECT gend, SUM(year) FROM settlements GROUP BY gend", "SUM needs a measure field"),
    # WHERE
    ("SELECT gend, COUNT(*) FROM settlements WHERE gend = 'ZX91' OR year = 987654"
     " GROUP BY gend", "OR (join conditions with AND"),
    ("SELECT gend, COUNT(*) FROM settlements WHERE NOT gend = 'ZX91' GROUP BY gend",
     "NOT (list the wanted values with IN) is not allowed"),
    ("SELECT gend, COUNT(*) FROM settlements WHERE medfee_sumamt > 987654 GROUP BY gend",
     "WHERE may not compare measures (medfee_sumamt)"),
    ("SELECT gend, COUNT(*) FROM settlements WHERE year > 987654 GROUP BY gend",
     "comparison > is not allowed in WHERE"),
    ("SELECT gend, COUNT(*) FROM settlements WHERE insu_admdvs LIKE 'ZX91%' GROUP BY gend",
     "LIKE"),
    ("SELECT gend, COUNT(*) FROM settlements WHERE year BETWEEN 1 AND 987654 GROUP BY gend",
     "BETWEEN"),
    ("SELECT gend, COUNT(*) FROM settlements WHERE year = 2024.5 GROUP BY gend",
     "string or integer values"),
    ("SELECT gend, COUNT(*) FROM settlements WHERE gend = 'ZX91' AND gend = '1'"
     " GROUP BY gend", "filtered twice"),
    ("SELECT gend, COUNT(*) FROM settlements WHERE ZX91 = '1' GROUP BY gend",
     "not a dimension of settlements"),
    # GROUP BY, HAVING, ORDER BY, LIMIT
    ("SELECT gend, COUNT(*) FROM settlements GROUP BY ROLLUP (gend)", "ROLLUP"),
    ("SELECT gend, COUNT(*) FROM settlements GROUP BY gend HAVING gend = 'ZX91'",
     "filter dimensions in WHERE"),
    ("SELECT gend, COUNT(*) FROM settlements GROUP BY gend HAVING COUNT(*) > 987654"
     " OR COUNT(*) < 987654", "OR (join conditions with AND"),
    ("SELECT gend, COUNT(*) FROM settlements GROUP BY gend LIMIT 10001", "LIMIT"),
    ("SELECT gend, COUNT(*) FROM settlements GROUP BY gend LIMIT 10%", "LIMIT PERCENT"),
    ("SELECT gend, COUNT(*) FROM settlements WHERE gend IN () GROUP BY gend",
     "IN needs at least one value"),
    ("SELECT gend, COUNT(*) FROM settlements GROUP BY gend HAVING SUM(hifp_pay) > SUM(acct_pay)",
     "HAVING compares with a number"),
    ("SELECT gend, COUNT(*) FROM main.settlements GROUP BY gend", "schema-qualified"),
    ("SELECT gend, COUNT(*) FROM settlements GROUP BY gend LIMIT 5 OFFSET 987654", "OFFSET"),
    ("SELECT gend, COUNT(*) FROM settlements GROUP BY gend ORDER BY year",
     "not in the result"),
    ("SELECT gend, COUNT(*) FROM settlements GROUP BY gend ORDER BY gend NULLS FIRST",
     "NULLS FIRST"),
    # FROM
    ("SELECT gend, COUNT(*) FROM ZX91_raw GROUP BY gend", "not a dataset"),
    ("SELECT gend, COUNT(*) FROM read_csv('/tmp/ZX91.csv') GROUP BY gend", "READ_CSV"),
    ("SELECT gend, COUNT(*) FROM settlements TABLESAMPLE 10% GROUP BY gend", "TABLESAMPLE"),
    ("SELECT 1", "FROM is required"),
    # parameters and literals that are not values
    ("SELECT gend, COUNT(*) FROM settlements WHERE gend = $1 GROUP BY gend", "a parameter"),
    ("SELECT gend, COUNT(*) FROM settlements WHERE gend = NULL GROUP BY gend", "NULL"),
]


@pytest.mark.parametrize(("sql", "named"), REFUSED)
def test_refused_constructs_are_named_without_echoing_values(sql: str, named: str) -> None:
    with pytest.raises(QueryRejected) as info:
        parse_sql(sql, purpose=PURPOSE, catalog=CATALOG)
    message = info.value.message
    assert named in message
    assert SECRET_TEXT not in message
    assert SECRET_NUMBER not in message
    assert info.value.status == 400


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT gend, COUNT(* FROM settlements WHERE gend = 'ZX91'",
        "SELECT 'ZX91",
        "SELECT gend FROM settlements WHERE x = 0x987654",
        "",
        "   ;  ",
        "(" * 5000 + SECRET_TEXT,
    ],
)
def test_unparseable_sql_is_refused_without_the_parsers_text(sql: str) -> None:
    with pytest.raises(QueryRejected) as info:
        parse_sql(sql, purpose=PURPOSE, catalog=CATALOG)
    assert info.value.message == "SQL could not be parsed"
    assert info.value.__cause__ is None
    assert info.value.__context__ is None  # the parser's error (which quotes SQL) is gone


def test_overlong_sql_is_refused_before_parsing() -> None:
    with pytest.raises(QueryRejected, match="longer than"):
        parse_sql("SELECT " + " " * 30_000 + "1", purpose=PURPOSE, catalog=CATALOG)


def test_a_label_may_not_shadow_a_column() -> None:
    for sql in (
        "SELECT gend, SUM(hifp_pay) AS year FROM settlements GROUP BY gend",
        "SELECT gend, SUM(hifp_pay) AS count, COUNT(*) FROM settlements GROUP BY gend",
        "SELECT gend AS g, COUNT(*) FROM settlements GROUP BY gend",
    ):
        with pytest.raises(QueryRejected):
            parse_sql(sql, purpose=PURPOSE, catalog=CATALOG)


def test_the_examples_in_docs_sql_md_are_accepted() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "sql.md").read_text(encoding="utf-8")
    examples = re.findall(r"```sql\n(.*?)```", doc, flags=re.S)
    assert len(examples) >= 4
    queries = [parse_sql(sql, purpose=PURPOSE, catalog=CATALOG) for sql in examples]
    for query in queries:
        compile_aggregate(query, CATALOG)
    (as_json,) = re.findall(r"```json\n(.*?)```", doc, flags=re.S)
    assert AggregateQuery.model_validate_json(as_json) == queries[0]
