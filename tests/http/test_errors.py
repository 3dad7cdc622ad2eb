"""Errors: JSON bodies, right statuses, no data or traces, fail closed."""

from __future__ import annotations

from pathlib import Path

from gateway.policy import build_engine
from tests.conftest import Env


def test_malformed_json_is_400_without_echo(env: Env) -> None:
    response = env.client.post("/v1/query/aggregate", content=b'{"purpose": "hmb_pri',
                               headers={**env.headers("insurer"),
                                        "Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_request"
    assert "hmb_pri" not in response.text


def test_unknown_member_is_400_naming_the_member(env: Env) -> None:
    response = env.aggregate("insurer", {"purpose": "hmb_pricing", "dataset": "settlements",
                                         "measures": [{"fn": "count"}], "sql": "DROP TABLE"})
    assert response.status_code == 400
    assert "sql" in response.json()["error"]["message"]
    assert "DROP" not in response.text


def test_unknown_route_is_json_404(env: Env) -> None:
    response = env.client.get("/v1/nothing-here", headers=env.headers("insurer"))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_openapi_is_served(env: Env) -> None:
    spec = env.client.get("/openapi.json").json()
    for path in ("/v1/oauth/token", "/v1/catalog", "/v1/grants", "/v1/query/aggregate",
                 "/healthz", "/readyz"):
        assert path in spec["paths"]


def test_health_and_readiness(env: Env) -> None:
    assert env.client.get("/healthz").json() == {"status": "ok"}
    ready = env.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"policy": True, "query_store": True, "state": True}
    assert "gateway_requests_total" in env.client.get("/metrics").text


def test_broken_policy_fails_closed_with_503(env: Env, tmp_path: Path) -> None:
    # A real engine over a policy whose decision document is malformed: the gateway must deny.
    policy_dir = tmp_path / "policies" / "gateway" / "authz"
    policy_dir.mkdir(parents=True)
    (policy_dir / "authz.rego").write_text(
        'package gateway.authz\n\ndecision := {"allow": true}\n', "utf-8")
    token = env.token("insurer")
    env.gateway.policy = build_engine("regorus", policy_dir=tmp_path / "policies")
    env.gateway._policy_data_version = -1
    before = env.gateway.audit.size()
    response = env.client.post(
        "/v1/query/aggregate",
        json={"purpose": "hmb_pricing", "dataset": "settlements", "measures": [{"fn": "count"}]},
        headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "policy_unavailable"
    assert "rows" not in response.json()
    assert env.gateway.audit.size() == before + 1
    assert env.client.get("/readyz").status_code in (200, 503)


def test_audit_unavailable_means_no_result(env: Env) -> None:
    token = env.token("insurer")
    env.gateway.audit.close()  # the real log, closed: every append is refused
    response = env.client.post(
        "/v1/query/aggregate",
        json={"purpose": "hmb_pricing", "dataset": "settlements", "dimensions": ["gend"],
              "measures": [{"fn": "count"}]},
        headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "audit_unavailable"
    assert "rows" not in response.json()
