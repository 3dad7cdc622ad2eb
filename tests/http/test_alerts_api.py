"""Alerts and auditor reports over HTTP: a refusal burst shows up as an alert naming its deny
entries, reports count what the test did, and every format is served safely."""

from __future__ import annotations

import csv
import io
import json
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import AuditEntry
from gateway.service.monitoring import Monitor
from tests.conftest import Env
from tests.http.test_cli import _run

DOCUMENT_CSP = "default-src 'none'; style-src 'unsafe-inline'"
GRANTED: dict[str, Any] = {"purpose": "hmb_pricing", "dataset": "settlements",
                           "dimensions": ["gend"], "measures": [{"fn": "count"}]}
UNGRANTED: dict[str, Any] = {**GRANTED, "dimensions": ["dise_codg"]}


@pytest.fixture
def monitor(env: Env) -> Iterator[Monitor]:
    """The app's monitor; until ``create_app`` makes one, one made and started as it will."""
    state = env.client.app.state  # type: ignore[attr-defined]
    made = getattr(state, "monitor", None) is None
    if made:
        state.monitor = Monitor(env.gateway.audit)
        state.monitor.start()
    found: Monitor = state.monitor
    yield found
    if made:
        found.stop()


def _denied_burst(env: Env, count: int = 12) -> list[int]:
    """``count`` refused aggregate queries from the insurer, quickly; their audit indexes."""
    headers = env.headers("insurer")
    indexes = []
    for _ in range(count):
        response = env.client.post("/v1/query/aggregate", json=UNGRANTED, headers=headers)
        assert response.status_code == 403, response.text
        indexes.append(int(response.headers["Audit-Index"]))
    return indexes


def _entry(env: Env, index: int) -> AuditEntry:
    return env.gateway.audit.get(index)


def test_refusal_burst_alert_names_the_deny_entries(env: Env, monitor: Monitor) -> None:
    denied = _denied_burst(env)
    response = env.client.get("/v1/audit/alerts", params={"rule": "refusal_burst"},
                              headers=env.headers("auditor"))
    assert response.status_code == 200, response.text
    audit_index = int(response.headers["Audit-Index"])
    read = _entry(env, audit_index)
    assert (read.action, read.decision, read.actor) == ("audit.alerts", "allow", "t-auditor")
    body = response.json()
    assert body["counts"]["refusal_burst"] >= 1
    assert body["observed_index"] >= denied[-1]
    (alert,) = body["alerts"]  # 12 denies: one burst of 10, the window then starts afresh
    assert alert["rule"] == "refusal_burst"
    assert alert["severity"] == "medium"
    assert alert["actor"] == "t-insurer"
    assert alert["org"] == "ins-a"
    assert len(alert["entry_indexes"]) == 10
    assert set(alert["entry_indexes"]) <= set(denied)
    assert alert["first_index"] == alert["entry_indexes"][0]
    assert alert["last_index"] == alert["entry_indexes"][-1]
    for index in alert["entry_indexes"]:
        entry = _entry(env, index)
        assert (entry.decision, entry.actor, entry.action) == (
            "deny", "t-insurer", "query.aggregate")
    # Polling after the last alert returns nothing new.
    again = env.client.get("/v1/audit/alerts", params={"after_index": alert["last_index"]},
                           headers=env.headers("auditor"))
    assert again.status_code == 200
    assert again.json()["alerts"] == []


def test_alerts_are_not_stale_and_other_rules_filter_out(env: Env, monitor: Monitor) -> None:
    monitor.stop()  # no background thread: the read itself must catch up with the log
    assert not monitor.running
    auditor = env.headers("auditor")
    first = env.client.get("/v1/audit/alerts", headers=auditor).json()
    assert first["alerts"] == []
    _denied_burst(env, 10)
    assert len(env.client.get("/v1/audit/alerts", headers=auditor).json()["alerts"]) == 1
    other = env.client.get("/v1/audit/alerts", params={"rule": "consent_new_key"},
                           headers=auditor)
    assert other.status_code == 200
    assert other.json()["alerts"] == []
    bad = env.client.get("/v1/audit/alerts", params={"rule": "nope"}, headers=auditor)
    assert bad.status_code == 400


def test_background_thread_follows_the_log_and_stops(env: Env, monitor: Monitor) -> None:
    monitor.start(interval_s=0.05)
    try:
        assert monitor.running
        denied = _denied_burst(env, 10)
        deadline = time.monotonic() + 10
        while monitor.engine.last_index < denied[-1] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert monitor.engine.counts_by_rule()["refusal_burst"] == 1
    finally:
        monitor.stop()
    assert not monitor.running
    assert not any(t.name == "audit-alerts" and t.is_alive() for t in threading.enumerate())
    monitor.stop()  # idempotent


def test_background_ticks_are_bounded(env: Env) -> None:
    _denied_burst(env, 4)
    small = Monitor(env.gateway.audit, tick_entries=3)
    size = env.gateway.audit.size()
    assert size > 3
    assert small.catch_up(3) == 3
    assert small.engine.last_index == 2
    assert small.catch_up() == size - 3


def test_metrics_count_alerts(env: Env, monitor: Monitor) -> None:
    _denied_burst(env, 10)
    monitor.catch_up()
    text = env.client.get("/metrics").text
    assert 'gateway_alerts_total{rule="refusal_burst"} 1.0' in text
    assert 'gateway_alerts_total{rule="differencing_pattern"} 0.0' in text


def test_insurer_gets_403_on_alerts_and_report(env: Env, monitor: Monitor) -> None:
    insurer = env.headers("insurer")
    for path in ("/v1/audit/alerts", "/v1/audit/report"):
        response = env.client.get(path, headers=insurer)
        assert response.status_code == 403, path
        entry = _entry(env, int(response.headers["Audit-Index"]))
        assert (entry.decision, entry.actor, entry.action) == ("deny", "t-insurer", "audit.read")


def _report(env: Env, **params: str) -> Any:
    return env.client.get("/v1/audit/report", params=params, headers=env.headers("auditor"))


def test_report_json_counts_what_was_done(env: Env) -> None:
    start = env.gateway.audit.size()
    for _ in range(3):
        assert env.aggregate("insurer", GRANTED).status_code == 200
    _denied_burst(env, 4)
    since = env.gateway.audit.get(start).ts  # from the first entry of this test on
    response = _report(env, since=since)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    read = _entry(env, int(response.headers["Audit-Index"]))
    assert (read.action, read.decision) == ("audit.report", "allow")
    report = response.json()
    (row,) = [r for r in report["access"] if r["org"] == "ins-a"]
    assert (row["purpose"], row["allowed"], row["refused"], row["errors"]) == (
        "hmb_pricing", 3, 4, 0)
    # Every entry since: 3 + 4 queries, 3 + 1 insurer tokens and the auditor's token.
    assert report["entries"] == 3 + 4 + 4 + 1
    assert report["refused"] == 4
    assert sum(r["count"] for r in report["refusals"]) >= 4
    assert report["since"] == since
    assert report["timezone"] == "Asia/Shanghai"


def test_report_csv_is_an_attachment_that_parses(env: Env) -> None:
    _denied_burst(env, 2)
    response = _report(env, format="csv", kind="refusals")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["content-disposition"].startswith("attachment; filename=")
    assert int(response.headers["Audit-Index"]) >= 0
    rows = list(csv.DictReader(io.StringIO(response.text, newline="")))
    assert rows
    assert list(rows[0]) == ["reason", "count", "first_index", "last_index"]
    assert sum(int(r["count"]) for r in rows) >= 2
    access = _report(env, format="csv", kind="access", bucket="hour")
    header = next(csv.reader(io.StringIO(access.text)))
    assert header == ["period", "org", "purpose", "allowed", "refused", "errors"]


def test_report_svg_and_html_are_safe_documents(env: Env) -> None:
    assert env.aggregate("insurer", GRANTED).status_code == 200
    svg = _report(env, format="svg")
    assert svg.status_code == 200, svg.text
    assert svg.headers["content-type"].startswith("image/svg+xml")
    assert svg.headers["content-security-policy"] == DOCUMENT_CSP
    assert svg.headers["x-content-type-options"] == "nosniff"
    assert "Audit-Index" in svg.headers
    root = ET.fromstring(svg.content)  # noqa: S314 - our own document, parsed to check it
    assert root.tag.endswith("svg")
    assert any(g.get("data-org") == "ins-a" for g in root.iter("{http://www.w3.org/2000/svg}g"))
    page = _report(env, format="html")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == DOCUMENT_CSP
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "<svg" in page.text
    assert "<script" not in page.text


@pytest.mark.parametrize(
    "params",
    [{"since": "yesterday"}, {"until": "2026-01-01T00:00:00"}, {"bucket": "week"},
     {"format": "png"}, {"kind": "everything"}],
)
def test_bad_report_parameters_are_400(env: Env, params: dict[str, str]) -> None:
    response = _report(env, **params)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "bad_request"


def test_cli_report_writes_a_file(env: Env, tmp_path: Path) -> None:
    _denied_burst(env, 3)
    workdir = str(env.settings.workdir)
    out = tmp_path / "refusals.csv"
    result = _run("audit", "report", "--workdir", workdir, "--format", "csv",
                  "--kind", "refusals", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text("utf-8"), newline="")))
    assert sum(int(r["count"]) for r in rows) >= 3
    page = tmp_path / "report.json"
    result = _run("audit", "report", "--workdir", workdir, "--format", "json",
                  "--since", "2000-01-01", "--out", str(page))
    assert result.returncode == 0, result.stderr
    assert json.loads(page.read_text("utf-8"))["refused"] >= 3
    bad = _run("audit", "report", "--workdir", workdir, "--format", "png",
               "--out", str(tmp_path / "x"))
    assert bad.returncode == 2
