"""POST /v1/query/sql: the same plan, policy, disclosure and audit as the JSON spec."""

from __future__ import annotations

import httpx

from tests.conftest import Env


def _sql(env: Env, sql: str, role: str = "insurer") -> httpx.Response:
    return env.client.post("/v1/query/sql", json={"purpose": "hmb_pricing", "sql": sql},
                           headers=env.headers(role))


def test_sql_and_json_give_the_same_answer(env: Env) -> None:
    sql = ("SELECT age_band, gend, count_persons(), SUM(psn_part_amt) FROM settlements "
           "WHERE year = 2024 AND med_type = '21' GROUP BY age_band, gend")
    by_sql = _sql(env, sql)
    by_json = env.aggregate("insurer", {
        "purpose": "hmb_pricing", "dataset": "settlements", "dimensions": ["age_band", "gend"],
        "measures": [{"fn": "count_persons"}, {"fn": "sum", "field": "psn_part_amt"}],
        "filters": {"year": [2024], "med_type": ["21"]}})
    assert by_sql.status_code == by_json.status_code == 200
    a, b = by_sql.json(), by_json.json()
    assert (a["columns"], a["rows"]) == (b["columns"], b["rows"])
    assert a["suppressed"] == b["suppressed"]
    entry = env.gateway.audit.get(a["audit_id"])
    assert entry.action == "query.sql"
    assert entry.request is not None
    assert "sql_sha256" in entry.request


def test_having_and_limit_act_on_released_values_only(env: Env) -> None:
    sql = ("SELECT age_band, gend, hosp_lv, count_persons() AS persons FROM settlements "
           "WHERE year = 2024 AND med_type = '21' GROUP BY age_band, gend, hosp_lv "
           "HAVING count_persons() < 1000 ORDER BY persons DESC LIMIT 5")
    response = _sql(env, sql)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["columns"] == ["age_band", "gend", "hosp_lv", "persons"]
    persons = [row[3] for row in body["rows"]]
    assert None not in persons  # a suppressed cell never satisfies HAVING
    assert all(p >= body["min_cell_size"] for p in persons)
    assert persons == sorted(persons, reverse=True)
    assert len(persons) <= 5


def test_identifier_in_where_is_refused_and_audited_without_the_text(env: Env) -> None:
    before = env.gateway.audit.size()
    response = _sql(env, "SELECT gend, COUNT(*) FROM settlements WHERE psn_no <> 'ZX91' "
                         "GROUP BY gend")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "query_rejected"
    assert "psn_no" in error["message"]
    assert "ZX91" not in response.text
    entries = env.gateway.audit.search(action="query.sql")
    assert entries
    index, entry = entries[-1]
    assert index >= before
    assert entry.decision == "deny"
    assert "ZX91" not in entry.model_dump_json()


def test_sql_is_held_to_the_grant(env: Env) -> None:
    response = _sql(env, "SELECT gend, SUM(acct_pay) FROM settlements GROUP BY gend")
    assert response.status_code == 403
    reasons = response.json()["error"]["reasons"]
    assert any("acct_pay" in r for r in reasons)
