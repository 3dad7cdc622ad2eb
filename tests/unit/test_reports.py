"""Tests of the auditor reports (gateway.audit.reports): counts equal a naive recount, CSV parses
back, the SVG chart is well-formed XML with one series per org."""

from __future__ import annotations

import csv
import io
import random
import xml.etree.ElementTree as ET
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gateway.audit import SqliteAuditLog
from gateway.audit.entry import AuditEntry, utc_timestamp
from gateway.audit.reports import (
    AuditReport,
    build_report,
    report_chart_svg,
    report_csv,
    report_html,
    report_json,
)
from gateway.audit.scan import iter_entries

SVG = "{http://www.w3.org/2000/svg}"
SHANGHAI = ZoneInfo("Asia/Shanghai")
START = datetime(2026, 11, 20, 0, 0, tzinfo=UTC)
ORGS = ["insurer-a", "insurer-b", "平安健康"]
PURPOSES = ["惠民保定价", "理赔核验", None]
REASONS = ["no active grant", "field not allowed for purpose", "cell too small"]


Cell = tuple[str, str, str, str]  # period, org, purpose, decision


def parse_svg(svg: str) -> ET.Element:
    """Parse our own SVG output (trusted: no entities, no DTD)."""
    return ET.fromstring(svg.encode("utf-8"))  # noqa: S314


def synthetic(n: int, seed: int = 5) -> list[tuple[int, AuditEntry]]:
    """``n`` entries over ~5 days: queries, person look-ups, catalog reads; some denied."""
    rng = random.Random(seed)
    out = []
    t = START
    for i in range(n):
        t += timedelta(seconds=rng.randrange(1, 900))
        decision = rng.choices(["allow", "deny", "error"], [7, 2, 1])[0]
        action = rng.choice(["query.aggregate", "query.aggregate", "persons.enrollment",
                             "catalog.read", "grants.create"])
        org = rng.choice([*ORGS, None])
        reasons = rng.sample(REASONS, rng.randrange(0, 3)) if decision == "deny" else []
        pseudonym = f"psn_{rng.randrange(40):04x}" if action.startswith("persons.") else None
        out.append((i, AuditEntry(
            ts=utc_timestamp(t), actor=f"client-{org}", role="insurer" if org else "anonymous",
            org=org, action=action, purpose=rng.choice(PURPOSES), decision=decision,
            reasons=reasons, status={"allow": 200, "deny": 403, "error": 500}[decision],
            error_code="policy_denied" if decision == "deny" else None,
            subject_pseudonym=pseudonym,
        )))
    return out


def naive_access(entries: list[tuple[int, AuditEntry]], bucket: str = "day") -> Counter[Cell]:
    counts: Counter[Cell] = Counter()
    fmt = "%Y-%m-%d" if bucket == "day" else "%Y-%m-%d %H:00"
    for _, e in entries:
        if e.action.split(".")[0] not in ("query", "persons"):
            continue
        local = datetime.fromisoformat(e.ts).astimezone(SHANGHAI)
        counts[(local.strftime(fmt), e.org or "(none)", e.purpose or "(none)", e.decision)] += 1
    return counts


def report_access(report: AuditReport) -> Counter[Cell]:
    counts: Counter[Cell] = Counter()
    for row in report.access:
        for decision, n in (("allow", row.allowed), ("deny", row.refused),
                            ("error", row.errors)):
            if n:
                counts[(row.period, row.org, row.purpose, decision)] += n
    return counts


@pytest.mark.parametrize("bucket", ["day", "hour"])
def test_counts_equal_a_naive_recount(bucket: str) -> None:
    entries = synthetic(3000)
    report = build_report(entries, bucket=bucket)  # type: ignore[arg-type]
    assert report_access(report) == naive_access(entries, bucket)
    assert report.entries == len(entries)
    assert report.allowed + report.refused + report.errors == len(entries)
    assert (report.first_index, report.last_index) == (0, len(entries) - 1)

    refusals: Counter[str] = Counter()
    for _, e in entries:
        if e.decision == "deny":
            for reason in e.reasons or ["(policy_denied)"]:
                refusals[reason] += 1
    assert {r.reason: r.count for r in report.refusals} == refusals
    counts = [r.count for r in report.refusals]
    assert counts == sorted(counts, reverse=True)

    persons: Counter[str] = Counter()
    for _, e in entries:
        if e.subject_pseudonym and e.decision == "allow":
            persons[e.subject_pseudonym] += 1
    assert {p.subject_pseudonym: p.allowed for p in report.persons if p.allowed} == persons
    assert [p.subject_pseudonym for p in report.persons] == sorted(
        {e.subject_pseudonym for _, e in entries if e.subject_pseudonym}
    )
    # periods are dense and ordered: every day (or hour) from the first to the last access
    assert list(report.periods) == sorted(report.periods)
    assert len(report.periods) == len(set(report.periods))
    assert {r.period for r in report.access} <= set(report.periods)
    if bucket == "day":
        assert len(report.periods) >= len({r.period for r in report.access})


def test_since_until_select_a_time_range() -> None:
    entries = synthetic(2000)
    # dates are local midnights in the report's zone
    report = build_report(entries, since="2026-11-21", until="2026-11-23")
    lo = datetime(2026, 11, 21, tzinfo=SHANGHAI)
    hi = datetime(2026, 11, 23, tzinfo=SHANGHAI)
    inside = [(i, e) for i, e in entries if lo <= datetime.fromisoformat(e.ts) < hi]
    assert report.entries == len(inside) > 0
    assert report_access(report) == naive_access(inside)
    assert set(report.periods) == {"2026-11-21", "2026-11-22"}
    assert report.since == "2026-11-20T16:00:00.000000Z"
    # aware datetimes and RFC 3339 strings work too
    same = build_report(entries, since=lo, until="2026-11-23T00:00:00+08:00")
    assert same == report
    with pytest.raises(ValueError, match="time zone"):
        build_report(entries, since="2026-11-21T00:00:00")
    with pytest.raises(ValueError, match="bucket"):
        build_report(entries, bucket="week")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="time zone"):
        build_report(entries, timezone="Nowhere/Land")


def test_csv_parses_back() -> None:
    report = build_report(synthetic(1500))
    for kind, rows, columns in [
        ("access", report.access, ["period", "org", "purpose", "allowed", "refused", "errors"]),
        ("refusals", report.refusals, ["reason", "count", "first_index", "last_index"]),
        ("persons", report.persons, ["subject_pseudonym", "allowed", "refused", "errors",
                                     "orgs", "first_ts", "last_ts"]),
    ]:
        text = report_csv(report, kind)
        assert text.endswith("\r\n")
        parsed = list(csv.reader(io.StringIO(text, newline="")))
        assert parsed[0] == columns
        assert len(parsed) == len(rows) + 1
        for got, row in zip(parsed[1:], rows, strict=True):
            assert got == [str(getattr(row, c)) for c in columns]
    with pytest.raises(ValueError, match="unknown report kind"):
        report_csv(report, "everything")


def test_csv_neutralizes_formulas() -> None:
    entry = AuditEntry(ts="2026-11-22T03:00:00.000000Z", actor="x", role="insurer",
                       org="=HYPERLINK(\"http://evil\")", action="query.aggregate",
                       purpose="a,b\n\"c\"", decision="deny", reasons=["@SUM(1)"], status=403)
    report = build_report([(0, entry)])
    access = list(csv.DictReader(io.StringIO(report_csv(report, "access"), newline="")))
    assert access[0]["org"] == "'=HYPERLINK(\"http://evil\")"
    assert access[0]["purpose"] == "a,b\n\"c\""  # quoting round-trips commas, quotes, newlines
    refusals = list(csv.DictReader(io.StringIO(report_csv(report, "refusals"), newline="")))
    assert refusals[0]["reason"] == "'@SUM(1)"


def test_svg_is_well_formed_with_one_series_per_org() -> None:
    entries = synthetic(1500)
    report = build_report(entries)
    svg = report_chart_svg(report)
    root = parse_svg(svg)
    assert root.tag == f"{SVG}svg"
    series = root.findall(f".//{SVG}g[@class='series']")
    assert [g.get("data-org") for g in series] == sorted({*ORGS, "(none)"})
    assert len(series) == len(report.orgs)
    # bar heights are proportional to the counts: allowed bars of one org sum as its allowed
    for g in series:
        tips = [t.text or "" for t in g.iter(f"{SVG}title")]
        allowed = sum(int(t.split("allowed ")[1].split(",")[0]) for t in tips)
        assert allowed == sum(r.allowed for r in report.access if r.org == g.get("data-org"))
    assert "<script" not in svg
    assert "href" not in svg


def test_svg_escapes_hostile_names_and_handles_empty() -> None:
    nasty = 'evil"<script>&\x01\'org'
    entry = AuditEntry(ts="2026-11-22T03:00:00.000000Z", actor="x", role="insurer", org=nasty,
                       action="query.aggregate", decision="allow", status=200)
    svg = report_chart_svg(build_report([(0, entry)]), title="<b>标题</b>")
    root = parse_svg(svg)
    [g] = root.findall(f".//{SVG}g[@class='series']")
    assert g.get("data-org") == nasty.replace("\x01", "\ufffd")
    assert "<script>" not in svg
    empty = report_chart_svg(build_report([]))
    assert parse_svg(empty).findall(f".//{SVG}g[@class='series']") == []
    assert "no data access" in empty


def test_html_and_json() -> None:
    report = build_report(synthetic(300), bucket="hour")
    page = report_html(report)
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<table>") == 3
    assert "<svg" in page
    assert "<script" not in page
    data = report_json(report)
    assert data["entries"] == 300
    assert data["access"][0].keys() == {"period", "org", "purpose", "allowed", "refused",
                                        "errors"}


def test_report_over_a_stored_log(tmp_path: Path) -> None:
    entries = synthetic(200)
    with SqliteAuditLog(tmp_path / "audit.db") as log:
        for _, entry in entries:
            log.append(entry)
        stored = list(iter_entries(log))
        assert stored == entries
        assert build_report(iter_entries(log)) == build_report(entries)
        cut = entries[100][1].ts
        later = list(iter_entries(log, since=datetime.fromisoformat(cut)))
        assert later == entries[100:]
