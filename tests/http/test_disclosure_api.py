"""Cross-request disclosure control over HTTP: what the response, the catalog and the audit
entry say about the difference check, rounding, noise and the budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from gateway.api.app import create_app
from gateway.service.bootstrap import build_gateway
from tests.conftest import BASE_URL, PRICING_GRANT, Env, LoadedStore, make_env

Q: dict[str, Any] = {"purpose": "hmb_pricing", "dataset": "person_years",
                     "dimensions": ["gend"],
                     "measures": [{"fn": "count_persons"}, {"fn": "sum", "field": "psn_part_amt"}],
                     "filters": {"year": [2024]}}
NOISY = {**PRICING_GRANT, "rounding": 5, "difference_k": 12,
         "noise": {"mechanism": "laplace", "epsilon": 1.0,
                   "bounds": {"psn_part_amt": [0, 20000]}},
         "budget": {"epsilon": 2.0, "period": "day"}}


def noisy_env(tmp_path: Path, loaded_store: LoadedStore, signing_key_file: Path) -> Env:
    return make_env(tmp_path, loaded_store.store_dir, signing_key_file, grant=NOISY)


def test_plain_answers_report_the_difference_check_and_no_budget(env: Env) -> None:
    body = env.aggregate("insurer", Q).json()
    assert body["disclosure"]["difference_k"] == 10  # the grant's minimum cell size
    assert body["disclosure"]["noise"] is None
    assert body["disclosure"]["release_id"].startswith("rel-")
    entry = env.gateway.audit.get(body["audit_id"])
    assert entry.budget_spent is None
    # Asked again: the same values (nothing differs from its own earlier release).
    assert env.aggregate("insurer", Q).json()["rows"] == body["rows"]


def test_the_catalog_publishes_the_noise_bounds(
    tmp_path: Path, loaded_store: LoadedStore, signing_key_file: Path
) -> None:
    env = noisy_env(tmp_path, loaded_store, signing_key_file)
    with env.client:
        grant = env.client.get("/v1/catalog", headers=env.headers("insurer")).json()[
            "datasets"]["person_years"]["grants"][0]
    assert grant["disclosure"] == {
        "difference_k": 12, "rounding": 5, "budget": {"epsilon": 2.0, "period": "day"},
        "noise": {"mechanism": "laplace", "epsilon": 1.0, "unit": "person-year",
                  "bounds": {"psn_part_amt": [0, 20000]}, "max_records_per_person_year": 20}}


def test_noise_spends_the_budget_until_429_and_the_audit_says_so(
    tmp_path: Path, loaded_store: LoadedStore, signing_key_file: Path
) -> None:
    env = noisy_env(tmp_path, loaded_store, signing_key_file)
    with env.client:
        headers = env.headers("insurer")
        first = env.client.post("/v1/query/aggregate", json=Q, headers=headers).json()
        assert first["disclosure"]["budget"]["epsilon_charged"] == 1.0
        assert first["disclosure"]["budget"]["grant_remaining"] == 1.0
        assert first["disclosure"]["noise"]["scales"] == {"count_persons": 2.0,
                                                          "_nsum_psn_part_amt": 4_000_000.0}
        assert all(row[1] % 5 == 0 for row in first["rows"])  # counts rounded to 5
        assert env.gateway.audit.get(first["audit_id"]).budget_spent == 1.0
        by_sex = {**Q, "filters": {"year": [2023]}}
        second = env.client.post("/v1/query/aggregate", json=by_sex, headers=headers).json()
        assert second["disclosure"]["budget"]["grant_remaining"] == 0.0
        refused = env.client.post("/v1/query/aggregate", json={**Q, "filters": {
            "year": [2022]}}, headers=headers)
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert error["code"] == "budget_exhausted"
        assert error["remaining"] == 0.0
        entry = env.gateway.audit.get(int(refused.headers["Audit-Index"]))
        assert (entry.status, entry.error_code) == (429, "budget_exhausted")
        # What was answered before is still answered, free, from the store.
        again = env.client.post("/v1/query/aggregate", json=Q, headers=headers).json()
        assert again["rows"] == first["rows"]
        assert again["disclosure"]["budget"]["epsilon_charged"] == 0.0


def test_the_sql_endpoint_takes_the_same_difference_check(env: Env) -> None:
    counties = ["420100", "420500"]
    first = env.client.post("/v1/query/sql", headers=env.headers("insurer"), json={
        "purpose": "hmb_pricing",
        "sql": "SELECT count_persons(), SUM(psn_part_amt) FROM settlements WHERE year = 2024 "  # noqa: S608
               f"AND insu_admdvs IN ('{counties[0]}', '{counties[1]}')"}).json()
    assert first["rows"][0][1] is not None
    # The same persons minus a handful: the smallest county's 2024 persons added to one.
    sizes = env.aggregate("insurer", {
        "purpose": "hmb_pricing", "dataset": "settlements", "dimensions": ["insu_admdvs"],
        "measures": [{"fn": "count_persons"}], "filters": {"year": [2024]}}).json()
    small = [sizes["rows"][c["row"]][0] for c in sizes["suppressed"]
             if c["reason"] == "primary"]
    assert small, "the test city has a county below the minimum cell size"
    base = env.client.post("/v1/query/sql", headers=env.headers("insurer"), json={
        "purpose": "hmb_pricing",
        "sql": "SELECT count_persons(), SUM(psn_part_amt) FROM settlements WHERE year = 2024 "  # noqa: S608
               f"AND insu_admdvs IN ('{counties[0]}')"}).json()
    plus = env.aggregate("insurer", {
        "purpose": "hmb_pricing", "dataset": "settlements",
        "measures": [{"fn": "count_persons"}, {"fn": "sum", "field": "psn_part_amt"}],
        "filters": {"year": [2024], "insu_admdvs": [counties[0], small[0]]}}).json()
    assert base["rows"][0][1] is not None
    assert plus["suppressed"][0]["reason"] == "difference"


def test_sub_totals_come_from_the_stored_finer_table(
    tmp_path: Path, loaded_store: LoadedStore, signing_key_file: Path
) -> None:
    env = make_env(tmp_path, loaded_store.store_dir, signing_key_file,
                   grant={**NOISY, "rounding": 1})
    with env.client:
        headers = env.headers("insurer")
        finer = env.client.post("/v1/query/aggregate", headers=headers, json={
            **Q, "dimensions": ["gend", "insutype"]}).json()
        coarser = env.client.post("/v1/query/aggregate", headers=headers, json=Q).json()
        total = env.client.post("/v1/query/aggregate", headers=headers, json={
            **Q, "dimensions": []}).json()
    assert finer["disclosure"]["budget"]["epsilon_charged"] == 1.0
    for answer in (coarser, total):
        assert answer["disclosure"]["budget"]["epsilon_charged"] == 0.0
        assert answer["disclosure"]["budget"]["from_finer_table"] > 0
    # The sub-totals add up exactly where every finer cell was released (noise included).
    if not finer["suppressed"]:
        for gend, persons, burden in coarser["rows"]:
            cells = [r for r in finer["rows"] if r[0] == gend]
            assert persons == sum(r[2] for r in cells)
            assert abs(burden - sum(r[3] for r in cells)) < 0.01
    assert total["rows"][0][0] == sum(r[1] for r in coarser["rows"])


def test_a_second_worker_sees_the_first_workers_releases(env: Env) -> None:
    # Two gateway processes' worth of state: separate caches, one state store.
    other = build_gateway(env.settings)
    other.clock = env.clock
    body = {"purpose": "hmb_pricing", "dataset": "settlements",
            "measures": [{"fn": "count_persons"}, {"fn": "sum", "field": "psn_part_amt"}]}
    # County sizes from the other dataset (its releases are remembered apart).
    sizes = env.aggregate("insurer", {
        **body, "dataset": "person_years", "dimensions": ["insu_admdvs"],
        "filters": {"year": [2024]}}).json()
    small = [sizes["rows"][c["row"]][0] for c in sizes["suppressed"]
             if c["reason"] == "primary"]
    big = max((r for r in sizes["rows"] if r[1] is not None), key=lambda r: r[1])[0]
    with TestClient(create_app(other), base_url=BASE_URL) as client:
        # The second worker's cache of releases is warm (and about to be stale).
        warm = client.post("/v1/query/aggregate", headers=env.headers("insurer"), json={
            **body, "filters": {"year": [2023]}})
        assert warm.status_code == 200
        first = env.aggregate("insurer", {**body, "filters": {
            "year": [2024], "insu_admdvs": [big, small[0]]}})
        assert first.json()["rows"][0][1] is not None
        second = client.post("/v1/query/aggregate", headers=env.headers("insurer"), json={
            **body, "filters": {"year": [2024], "insu_admdvs": [big]}}).json()
    assert second["suppressed"][0]["reason"] == "difference"
    other.audit.close()
