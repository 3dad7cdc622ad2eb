"""User stories over HTTP: token → catalog → aggregate queries, suppression, refusals, audit."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import duckdb
import pytest

from gateway.query.store import StoreLayout
from tests.conftest import PRICING_GRANT, Env, LoadedStore

Q_BASE: dict[str, Any] = {"purpose": "hmb_pricing", "dataset": "settlements"}


def _direct(loaded_store: LoadedStore, sql: str) -> list[tuple[Any, ...]]:
    """The same question answered straight from the DuckDB file, written by hand."""
    layout = StoreLayout(loaded_store.store_dir)
    version = layout.current_version()
    assert version is not None
    with duckdb.connect(str(layout.version_path(version)), read_only=True) as con:
        return con.execute(sql).fetchall()


def test_catalog_lists_granted_fields_with_justifications(env: Env) -> None:
    response = env.client.get("/v1/catalog", headers=env.headers("insurer"))
    assert response.status_code == 200
    entry = env.gateway.audit.get(int(response.headers["Audit-Index"]))
    assert (entry.action, entry.actor) == ("catalog.read", "t-insurer")
    body = response.json()
    assert set(body["datasets"]) == {"settlements", "person_years"}
    grant = body["datasets"]["settlements"]["grants"][0]
    dims = {d["name"]: d for d in grant["dimensions"]}
    assert set(dims) == {"age_band", "gend", "insu_admdvs", "insutype", "year", "med_type",
                         "hosp_lv"}
    assert dims["gend"]["justification"]
    measures = {m["name"] for m in grant["measures"]}
    assert "psn_part_amt" in measures
    assert "acct_pay" not in measures
    assert "exposure" not in measures  # a person_years measure, not a settlements one


def test_other_insurer_sees_an_empty_catalog(env: Env) -> None:
    response = env.client.get("/v1/catalog", headers=env.headers("insurer_b"))
    assert response.status_code == 200
    assert response.json()["datasets"] == {}


def test_aggregate_matches_duckdb_and_suppresses_small_cells(
    env: Env, loaded_store: LoadedStore
) -> None:
    body = {
        **Q_BASE,
        "dimensions": ["age_band", "gend", "hosp_lv"],
        "measures": [{"fn": "count_persons"}, {"fn": "count"},
                     {"fn": "sum", "field": "psn_part_amt"},
                     {"fn": "mean", "field": "medfee_sumamt"}],
        "filters": {"year": [2024], "med_type": ["21"]},
    }
    response = env.aggregate("insurer", body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["columns"] == ["age_band", "gend", "hosp_lv", "count_persons", "count",
                                 "sum_psn_part_amt", "mean_medfee_sumamt"]
    expected = _direct(loaded_store, """
        SELECT age_band, gend, hosp_lv, count(DISTINCT psn_id), count(*), sum(psn_part_amt),
               avg(medfee_sumamt)
        FROM settlements WHERE year = 2024 AND med_type = '21'
        GROUP BY ALL ORDER BY ALL""")
    assert len(result["rows"]) == len(expected)
    suppressed_rows = {c["row"] for c in result["suppressed"]}
    assert result["suppressed_count"] == len(suppressed_rows)
    assert suppressed_rows, "a fine inpatient breakdown of 3,000 persons must have small cells"
    reasons = {c["row"]: c["reason"] for c in result["suppressed"]}
    for i, (got, want) in enumerate(zip(result["rows"], expected, strict=True)):
        assert got[:3] == list(want[:3])
        if want[3] < 10:
            assert reasons.get(i) == "primary"
        if reasons.get(i) in ("dominance", "p_percent"):  # counts stay, sum and mean go
            assert got[3:] == [want[3], want[4], None, None]
        elif i in suppressed_rows:
            assert got[3:] == [None, None, None, None]
        else:
            assert got[3:5] == [want[3], want[4]]
            assert Decimal(str(got[5])) == want[5]
            assert got[6] == pytest.approx(float(want[6]), abs=0.01)
    # Complementary suppression: no line (cells sharing all but one dimension value) holds
    # exactly one suppressed cell, so none is recoverable from the line's total.
    for axis in range(3):
        lines: dict[tuple[Any, ...], list[int]] = {}
        for i, row in enumerate(result["rows"]):
            lines.setdefault(tuple(v for k, v in enumerate(row[:3]) if k != axis), []).append(i)
        for members in lines.values():
            hidden = [i for i in members if i in suppressed_rows]
            assert len(hidden) != 1 or len(members) == 1, (axis, members, hidden)
    assert response.headers["Audit-Index"] == str(result["audit_id"])


def test_totals_without_dimensions(env: Env, loaded_store: LoadedStore) -> None:
    response = env.aggregate("insurer", {
        "purpose": "hmb_pricing", "dataset": "person_years",
        "measures": [{"fn": "sum", "field": "exposure"}, {"fn": "count_persons"}],
        "filters": {"year": ["2023"]},
    })
    assert response.status_code == 200, response.text
    (want,) = _direct(loaded_store,
                      "SELECT sum(exposure), count(DISTINCT psn_id) FROM person_years "
                      "WHERE year = 2023")
    (row,) = response.json()["rows"]
    assert row[0] == pytest.approx(want[0], abs=0.01)
    assert row[1] == want[1]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"dimensions": ["dise_codg"]}, "dimension dise_codg"),
        ({"measures": [{"fn": "sum", "field": "acct_pay"}]}, "acct_pay"),
        ({"measures": [{"fn": "max", "field": "medfee_sumamt"}]}, "max"),
        ({"measures": [{"fn": "min", "field": "psn_part_amt"}]}, "min"),
        ({"purpose": "claims_fast_track"}, "claims_fast_track"),
        ({"filters": {"fixmedins_code": ["H42010200001"]}}, "fixmedins_code"),
    ],
    ids=["ungranted-dimension", "ungranted-measure", "max", "min", "ungranted-purpose",
         "filter-on-ungranted-field"],
)
def test_refusals_outside_the_grant(env: Env, change: dict[str, Any], reason: str) -> None:
    body = {**Q_BASE, "dimensions": ["gend"], "measures": [{"fn": "count"}], **change}
    response = env.aggregate("insurer", body)
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["code"] == "policy_denied"
    assert any(reason in r for r in error["reasons"]), error["reasons"]
    assert "rows" not in response.json()


def test_ungranted_dataset_is_refused(env: Env, tmp_path: Any) -> None:
    grant = {**PRICING_GRANT, "insurer": "ins-b", "datasets": ["person_years"],
             "dimensions": ["gend"], "measures": ["exposure"]}
    created = env.client.post("/v1/grants", json=grant, headers=env.headers("admin"))
    assert created.status_code == 201, created.text
    response = env.aggregate("insurer_b", {**Q_BASE, "dimensions": ["gend"],
                                           "measures": [{"fn": "count"}]})
    assert response.status_code == 403
    assert any("settlements" in r for r in response.json()["error"]["reasons"])


def test_another_insurers_grant_does_not_apply(env: Env) -> None:
    response = env.aggregate("insurer_b", {**Q_BASE, "dimensions": ["gend"],
                                           "measures": [{"fn": "count"}]})
    assert response.status_code == 403
    assert response.json()["error"]["reasons"]


def test_revoked_grant_stops_the_very_next_request(env: Env) -> None:
    body = {**Q_BASE, "dimensions": ["gend"], "measures": [{"fn": "count"}]}
    assert env.aggregate("insurer", body).status_code == 200
    revoked = env.client.delete(f"/v1/grants/{env.grant_id}", headers=env.headers("admin"))
    assert revoked.status_code == 200
    assert revoked.json()["status"] == "revoked"
    response = env.aggregate("insurer", body)
    assert response.status_code == 403
    assert any("revoked" in r for r in response.json()["error"]["reasons"])


def test_expired_grant_is_refused(env: Env) -> None:
    body = {**Q_BASE, "dimensions": ["gend"], "measures": [{"fn": "count"}]}
    assert env.aggregate("insurer", body).status_code == 200
    env.clock.offset = 400 * 86400.0  # past the default one-year validity
    response = env.aggregate("insurer", body)
    assert response.status_code == 403
    assert any("expired" in r for r in response.json()["error"]["reasons"])


def test_grant_wider_than_its_purpose_is_refused(env: Env) -> None:
    grant = {**PRICING_GRANT, "measures": ["acct_pay", "psn_part_amt"]}
    response = env.client.post("/v1/grants", json=grant, headers=env.headers("admin"))
    assert response.status_code == 422
    problems = response.json()["error"]["problems"]
    assert "field acct_pay is not necessary for purpose hmb_pricing" in problems


def test_insurer_cannot_manage_grants_and_admin_cannot_query(env: Env) -> None:
    response = env.client.post("/v1/grants", json=PRICING_GRANT,
                               headers=env.headers("insurer"))
    assert response.status_code == 403
    response = env.aggregate("admin", {**Q_BASE, "measures": [{"fn": "count"}]})
    assert response.status_code == 403


def test_every_request_allowed_or_denied_is_audited(env: Env) -> None:
    before = env.gateway.audit.size()
    ok = env.aggregate("insurer", {**Q_BASE, "dimensions": ["gend"],
                                   "measures": [{"fn": "count"}]})
    denied = env.aggregate("insurer", {**Q_BASE, "dimensions": ["dise_codg"],
                                       "measures": [{"fn": "count"}]})
    unauthenticated = env.client.post("/v1/query/aggregate", json=Q_BASE)
    assert (ok.status_code, denied.status_code, unauthenticated.status_code) == (200, 403, 401)
    # two token exchanges + two queries + one anonymous refusal
    assert env.gateway.audit.size() == before + 5
    entries = env.client.get("/v1/audit/entries", params={"action": "query.aggregate"},
                             headers=env.headers("auditor")).json()["entries"]
    decisions = [(e["decision"], e["status"]) for e in entries]
    assert ("allow", 200) in decisions
    assert ("deny", 403) in decisions
    allowed = next(e for e in entries if e["decision"] == "allow")
    assert allowed["grant_id"] == env.grant_id
    assert allowed["fields"] == ["gend"]
    assert allowed["field_justifications"]["gend"]
    assert allowed["policy_version"]
    assert allowed["data_version"]
    assert allowed["response_hash"].startswith("sha256:")
    assert allowed["cells_released"] == 2
    env.gateway.audit.verify()


def test_insurer_cannot_read_the_audit_log(env: Env) -> None:
    response = env.client.get("/v1/audit/entries", headers=env.headers("insurer"))
    assert response.status_code == 403
