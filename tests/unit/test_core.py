"""Pure core: pseudonyms (Python and DuckDB agree), compiler, disclosure, grant validation."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import pytest

from gateway.catalog import default_catalog
from gateway.disclosure.suppression import disclose
from gateway.errors import QueryRejected, ValidationFailed
from gateway.ingest.generalize import age_band
from gateway.ingest.pipeline import _PSEUDONYM
from gateway.ingest.pseudonym import hmac_pads, pseudonym
from gateway.query.compiler import compile_aggregate
from gateway.query.spec import AggregateQuery
from gateway.service.grants import GrantRequest, validate_grant

CATALOG = default_catalog()
NOW = datetime(2026, 11, 22, tzinfo=UTC)


@pytest.mark.parametrize("value", ["42010000000000000001", "a\\x41中文", "", "'; DROP TABLE x"])
def test_duckdb_hmac_equals_rfc2104_hmac(value: str) -> None:
    key = hashlib.sha256(b"test key").digest()
    ipad, opad = hmac_pads(key)
    sql = "SELECT " + _PSEUDONYM.format(col="$v")
    (got,) = duckdb.connect().execute(sql, {"ipad": ipad, "opad": opad, "v": value}).fetchall()
    want = int(hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:15], 16)
    assert got[0] == want == pseudonym(key, value)


def test_pseudonyms_depend_on_the_key() -> None:
    assert pseudonym(b"a" * 32, "4201") != pseudonym(b"b" * 32, "4201")


def test_age_bands_cover_every_age() -> None:
    assert [age_band(a) for a in (0, 17, 18, 29, 30, 59, 60, 80, 110)] == [
        "0-17", "0-17", "18-29", "18-29", "30-39", "50-59", "60-69", "80+", "80+"]
    with pytest.raises(ValueError, match="negative"):
        age_band(-1)


def _query(**over: Any) -> AggregateQuery:
    body: dict[str, Any] = {"purpose": "hmb_pricing", "dataset": "settlements",
                            "dimensions": ["gend"], "measures": [{"fn": "count"}], **over}
    return AggregateQuery.model_validate(body)


def test_compiled_sql_runs_and_counts_distinct_persons() -> None:
    con = duckdb.connect()
    con.execute("CREATE TABLE settlements (psn_id BIGINT, gend VARCHAR, year BIGINT, "
                "medfee_sumamt DECIMAL(18,2))")
    con.execute("INSERT INTO settlements VALUES (1,'1',2024,10),(1,'1',2024,20),(2,'2',2024,5),"
                "(3,'2',2023,7)")
    compiled = compile_aggregate(_query(measures=[{"fn": "count_persons"}, {"fn": "count"},
                                                  {"fn": "sum", "field": "medfee_sumamt"}],
                                        filters={"year": ["2024"]}), CATALOG)
    rows = con.execute(compiled.sql).fetchall()
    assert [r[:4] for r in rows] == [("1", 1, 1, 2), ("2", 1, 1, 1)]
    assert compiled.measures == ("count_persons", "count", "sum_medfee_sumamt")


def test_filter_values_are_literals_not_sql() -> None:
    compiled = compile_aggregate(_query(filters={"gend": ["1') OR 1=1 --"]}), CATALOG)
    assert "'1'') OR 1=1 --'" in compiled.sql
    con = duckdb.connect()
    con.execute("CREATE TABLE settlements (psn_id BIGINT, gend VARCHAR)")
    con.execute("INSERT INTO settlements VALUES (1, '1')")
    assert con.execute(compiled.sql).fetchall() == []


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"dataset": "persons_raw"}, "unknown dataset"),
        ({"dimensions": ["psn_id"]}, "not a dimension"),
        ({"dimensions": ["gend", "gend"]}, "twice"),
        ({"measures": [{"fn": "max", "field": "medfee_sumamt"}]}, "not allowed"),
        ({"measures": [{"fn": "sum"}]}, "needs a measure field"),
        ({"measures": [{"fn": "sum", "field": "psn_id"}]}, "needs a measure field"),
        ({"measures": [{"fn": "count", "field": "medfee_sumamt"}]}, "takes no field"),
        ({"filters": {"year": ["twenty"]}}, "integer"),
        ({"filters": {"gend": []}}, "at least one value"),
    ],
)
def test_compiler_refuses_what_the_catalog_lacks(over: dict[str, Any], message: str) -> None:
    with pytest.raises(QueryRejected, match=message):
        compile_aggregate(_query(**over), CATALOG)


def test_disclosure_suppresses_below_the_minimum_only() -> None:
    rows = [("1", 10, 5, 99.999), ("2", 9, 4, 1.0), ("9", 0, 0, None)]
    result = disclose(["gend"], ["count", "mean_x"], rows, min_cell_size=10, max_rows=10)
    assert result.rows == [["1", 5, 100.0], ["2", None, None], ["9", None, None]]
    assert [(c.row, c.reason) for c in result.suppressed] == [(1, "primary"), (2, "primary")]
    assert result.cells_released == 1
    assert "2 cell(s) suppressed" in result.notes[-1]


def test_disclosure_row_limit() -> None:
    rows = [(str(i), 50, 1) for i in range(5)]
    result = disclose(["k"], ["count"], rows, min_cell_size=10, max_rows=3)
    assert len(result.rows) == 3
    assert "truncated" in result.notes[0]


def _grant(**over: Any) -> GrantRequest:
    body: dict[str, Any] = {"insurer": "ins-a", "purpose": "hmb_pricing",
                            "datasets": ["settlements"], "dimensions": ["gend", "year"],
                            "measures": ["psn_part_amt"], **over}
    return GrantRequest.model_validate(body)


def test_a_grant_within_its_purpose_is_valid() -> None:
    start, end = validate_grant(_grant(), CATALOG, NOW)
    assert end - start == 366 * 86400 * 10**9


@pytest.mark.parametrize(
    ("over", "problem"),
    [
        ({"measures": ["acct_pay"]}, "field acct_pay is not necessary for purpose hmb_pricing"),
        ({"purpose": "enrollment_check"},
         "field psn_part_amt is not necessary for purpose enrollment_check"),
        ({"dimensions": ["dise_codg"]}, "unknown dimension dise_codg"),
        ({"datasets": ["raw_persons"]}, "unknown dataset raw_persons"),
        ({"min_cell_size": 2}, "min_cell_size must be at least 5"),
        ({"filters": {"insu_admdvs": ["420100"]}},
         "filter on insu_admdvs needs insu_admdvs among the granted dimensions"),
        ({"valid_until": NOW + timedelta(days=800)},
         "a hmb_pricing grant may last at most 366 days"),
        ({"valid_until": NOW - timedelta(days=1), "valid_from": NOW - timedelta(days=9)},
         "valid_until is in the past"),
    ],
)
def test_grant_refusals(over: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        validate_grant(_grant(**over), CATALOG, NOW)
    assert problem in info.value.details["problems"]
