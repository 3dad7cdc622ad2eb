"""Dominance and p% on /v1/query/aggregate and /v1/query/sql: one planted huge claim.

A copy of the test city where one person in (40-49, 男) has a 2024 settlement of 5,000,000 元
of 个人负担. The cell has over 100 persons, so cell size alone would release its sum — and the
sum would be that person's claim to within a few percent.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest

from gateway.query.store import StoreLayout
from tests.conftest import PRICING_GRANT, Env, LoadedStore, make_env

PLANTED = Decimal("5000000.00")
QUERY: dict[str, Any] = {
    "purpose": "hmb_pricing", "dataset": "settlements", "dimensions": ["age_band", "gend"],
    "measures": [{"fn": "count_persons"}, {"fn": "count"},
                 {"fn": "sum", "field": "psn_part_amt"}, {"fn": "mean", "field": "psn_part_amt"}],
    "filters": {"year": [2024]},
}
SQL = ("SELECT age_band, gend, count_persons(), COUNT(*), SUM(psn_part_amt), "
       "MEAN(psn_part_amt) FROM settlements WHERE year = 2024 GROUP BY age_band, gend")


@pytest.fixture(scope="module")
def planted_store(loaded_store: LoadedStore, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store_dir = tmp_path_factory.mktemp("planted") / "store"
    shutil.copytree(loaded_store.store_dir, store_dir)
    layout = StoreLayout(store_dir)
    version = layout.current_version()
    assert version is not None
    with duckdb.connect(str(layout.version_path(version))) as con:
        con.execute("""
            UPDATE settlements SET psn_part_amt = ?
            WHERE rowid = (SELECT min(rowid) FROM settlements
                           WHERE year = 2024 AND age_band = '40-49' AND gend = '1')""",
                    [PLANTED])
    return store_dir


def _env(tmp_path: Path, store: Path, signing_key_file: Path,
         **grant: Any) -> Iterator[Env]:
    environment = make_env(tmp_path, store, signing_key_file, grant={**PRICING_GRANT, **grant})
    with environment.client:
        yield environment
    environment.gateway.audit.close()


@pytest.fixture
def planted(tmp_path: Path, planted_store: Path, signing_key_file: Path) -> Iterator[Env]:
    yield from _env(tmp_path, planted_store, signing_key_file)


def _direct(store: Path) -> list[tuple[Any, ...]]:
    layout = StoreLayout(store)
    version = layout.current_version()
    assert version is not None
    with duckdb.connect(str(layout.version_path(version)), read_only=True) as con:
        return con.execute("""
            SELECT age_band, gend, count(DISTINCT psn_id), count(*), sum(psn_part_amt)
            FROM settlements WHERE year = 2024 GROUP BY ALL ORDER BY ALL""").fetchall()


def test_a_sum_dominated_by_one_claim_is_withheld_counts_stay_and_the_line_is_protected(
    planted: Env, planted_store: Path
) -> None:
    response = planted.aggregate("insurer", QUERY)
    assert response.status_code == 200, response.text
    body = response.json()
    direct = _direct(planted_store)
    row = next(i for i, r in enumerate(body["rows"]) if r[:2] == ["40-49", "1"])
    reasons = {c["row"]: c for c in body["suppressed"]}
    assert reasons[row]["reason"] == "dominance"
    assert reasons[row]["measures"] == ["sum_psn_part_amt", "mean_psn_part_amt"]
    persons, count = direct[row][2], direct[row][3]
    assert body["rows"][row] == ["40-49", "1", persons, count, None, None]
    assert persons >= 100  # cell size alone would have released it
    # What the attacker has: every released sum and the line totals (the coarser queries).
    # No line through the planted cell has it as its only withheld sum.
    sums_hidden = {c["row"] for c in body["suppressed"] if "sum_psn_part_amt" in c["measures"]}
    same_band = [i for i, r in enumerate(body["rows"]) if r[0] == "40-49"]
    same_sex = [i for i, r in enumerate(body["rows"]) if r[1] == "1"]
    for line in (same_band, same_sex):
        assert len(sums_hidden & set(line)) >= 2, line
    for i, r in enumerate(body["rows"]):
        if i not in sums_hidden:
            assert Decimal(str(r[4])) == direct[i][4]
    assert not any("not applied" in note for note in body["notes"])


def test_sql_gets_the_same_magnitude_rules(planted: Env) -> None:
    json_answer = planted.aggregate("insurer", QUERY).json()
    response = planted.client.post("/v1/query/sql", json={"purpose": "hmb_pricing", "sql": SQL},
                                   headers=planted.headers("insurer"))
    assert response.status_code == 200, response.text
    sql_answer = response.json()
    assert sql_answer["rows"] == json_answer["rows"]
    assert sql_answer["suppressed"] == json_answer["suppressed"]
    assert "dominance" in {c["reason"] for c in sql_answer["suppressed"]}


def test_thresholds_come_from_the_grant(
    tmp_path: Path, planted_store: Path, signing_key_file: Path
) -> None:
    # A grant that accepts a cell as long as the top two stay under 100% and the rest is over
    # 0.1% of the largest: the planted cell passes both, so its sum is released.
    for env in _env(tmp_path, planted_store, signing_key_file, dominance_k=1.0,
                    p_percent=0.001):
        body = env.aggregate("insurer", QUERY).json()
        row = next(i for i, r in enumerate(body["rows"]) if r[:2] == ["40-49", "1"])
        assert row not in {c["row"] for c in body["suppressed"]}
        assert Decimal(str(body["rows"][row][4])) > PLANTED
        grant = env.client.get("/v1/grants", headers=env.headers("admin")).json()["grants"][0]
        assert (grant["dominance_k"], grant["p_percent"]) == (1.0, 0.001)
