"""Auditor reports: pure functions over audit entries.

:func:`build_report` counts, over the entries in ``[since, until)``:

- **access over time**: data-access entries (``query.*``, ``persons.*``) per day or hour (in the
  report's time zone, Asia/Shanghai by default) by org and purpose, allowed / refused / errors;
- **refusals by reason**: every denied entry (any action) counted under each of its reasons;
- **per-person access**: entries about a person, by ``subject_pseudonym`` (the keyed pseudonym;
  the log never holds a raw identifier, :class:`~gateway.audit.entry.AuditEntry` refuses one).

:func:`report_csv` exports one table as CSV, :func:`report_chart_svg` draws access over time as a
self-contained SVG (written by hand, no matplotlib: see ``docs/alerts.md``) and
:func:`report_html` puts the chart and the tables in one self-contained HTML page.
"""

from __future__ import annotations

import csv
import html
import io
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.audit.entry import AuditEntry, ts_bound
from gateway.audit.scan import parse_ts

__all__ = [
    "REPORT_KINDS",
    "AccessRow",
    "AuditReport",
    "PersonRow",
    "RefusalRow",
    "build_report",
    "report_chart_svg",
    "report_csv",
    "report_html",
    "report_json",
]

Bucket = Literal["day", "hour"]
ReportKind = Literal["access", "refusals", "persons"]
REPORT_KINDS: Final = ("access", "refusals", "persons")
NO_ORG: Final = "(none)"
NO_PURPOSE: Final = "(none)"
NO_REASON: Final = "(no reason given)"
#: Beyond this many periods the chart shows only the periods that have entries.
MAX_DENSE_PERIODS: Final = 2000


@dataclass(frozen=True, slots=True)
class AccessRow:
    """Data-access entries of one period, org and purpose."""

    period: str
    org: str
    purpose: str
    allowed: int
    refused: int
    errors: int


@dataclass(frozen=True, slots=True)
class RefusalRow:
    """Denied entries giving one reason, and the first and last of them."""

    reason: str
    count: int
    first_index: int
    last_index: int


@dataclass(frozen=True, slots=True)
class PersonRow:
    """Entries about one person (by pseudonym)."""

    subject_pseudonym: str
    allowed: int
    refused: int
    errors: int
    orgs: int
    first_ts: str
    last_ts: str


@dataclass(frozen=True, slots=True)
class AuditReport:
    """What :func:`build_report` found. Rows are in a stable order: access by (period, org,
    purpose); refusals by count descending, then reason; persons by pseudonym."""

    since: str | None
    until: str | None
    bucket: Bucket
    timezone: str
    entries: int
    allowed: int
    refused: int
    errors: int
    first_index: int | None
    last_index: int | None
    periods: tuple[str, ...]
    orgs: tuple[str, ...]
    access: tuple[AccessRow, ...]
    refusals: tuple[RefusalRow, ...]
    persons: tuple[PersonRow, ...]


def _matches(action: str, prefixes: Sequence[str]) -> bool:
    return any(action == p or (p.endswith(".") and action.startswith(p)) for p in prefixes)


def _period_label(local: datetime, bucket: Bucket) -> str:
    return local.strftime("%Y-%m-%d" if bucket == "day" else "%Y-%m-%d %H:00")


def _dense_periods(first_t: float, last_t: float, zone: ZoneInfo, bucket: Bucket) -> list[str]:
    """Every period label from the one holding ``first_t`` to the one holding ``last_t``
    (empty when there would be more than ``MAX_DENSE_PERIODS``)."""
    step = 86400.0 if bucket == "day" else 3600.0
    if (last_t - first_t) / step > MAX_DENSE_PERIODS:
        return []
    if bucket == "day":
        day = datetime.fromtimestamp(first_t, zone).date()
        last_day = datetime.fromtimestamp(last_t, zone).date()
        days = []
        while day <= last_day:
            days.append(day.isoformat())
            day += timedelta(days=1)
        return days
    # hours: walk in UTC so a DST change cannot skip or loop; a repeated label is kept once
    labels: list[str] = []
    hour = math.floor(first_t / 3600) * 3600
    while hour <= last_t:
        label = _period_label(datetime.fromtimestamp(hour, zone), bucket)
        if label not in labels[-2:]:
            labels.append(label)
        hour += 3600
    return labels


def build_report(
    entries: Iterable[tuple[int, AuditEntry]],
    *,
    since: str | datetime | None = None,
    until: str | datetime | None = None,
    bucket: Bucket = "day",
    timezone: str = "Asia/Shanghai",
    access_actions: Sequence[str] = ("query.", "persons."),
) -> AuditReport:
    """Count ``entries`` (``(index, entry)`` in any order) whose ``ts`` is in ``[since,
    until)``. A bound is an aware datetime, an RFC 3339 timestamp with a zone, or a
    ``YYYY-MM-DD`` date meaning midnight **in** ``timezone``. ``ValueError`` for a bad bound,
    bucket or zone. Memory grows with the number of (period, org, purpose) cells, reasons and
    pseudonyms, not with the number of entries."""
    if bucket not in ("day", "hour"):
        raise ValueError(f"bucket must be 'day' or 'hour', got {bucket!r}")
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {timezone!r}") from None
    lo = ts_bound("since", since, zone)
    hi = ts_bound("until", until, zone)

    access: dict[tuple[str, str, str], list[int]] = {}
    refusals: dict[str, list[int]] = {}
    persons: dict[str, tuple[list[int], set[str], list[str]]] = {}
    decision_slot = {"allow": 0, "deny": 1, "error": 2}
    totals = [0, 0, 0]
    count = 0
    first_index: int | None = None
    last_index: int | None = None
    span: list[float] = []
    for index, entry in entries:
        ts = entry.ts
        if (lo is not None and ts < lo) or (hi is not None and ts >= hi):
            continue
        count += 1
        first_index = index if first_index is None else min(first_index, index)
        last_index = index if last_index is None else max(last_index, index)
        slot = decision_slot[entry.decision]
        totals[slot] += 1
        if _matches(entry.action, access_actions):
            t = parse_ts(ts)
            span = [min(span[0], t), max(span[1], t)] if span else [t, t]
            period = _period_label(datetime.fromtimestamp(t, zone), bucket)
            key = (period, entry.org or NO_ORG, entry.purpose or NO_PURPOSE)
            access.setdefault(key, [0, 0, 0])[slot] += 1
        if entry.decision == "deny":
            reasons = entry.reasons or [
                f"({entry.error_code})" if entry.error_code else NO_REASON
            ]
            for reason in dict.fromkeys(reasons):  # a reason repeated in one entry counts once
                row = refusals.get(reason)
                if row is None:
                    refusals[reason] = [1, index, index]
                else:
                    row[0] += 1
                    row[1] = min(row[1], index)
                    row[2] = max(row[2], index)
        if entry.subject_pseudonym is not None:
            person = persons.get(entry.subject_pseudonym)
            if person is None:
                person = persons[entry.subject_pseudonym] = ([0, 0, 0], set(), [ts, ts])
            person[0][slot] += 1
            if entry.org is not None:
                person[1].add(entry.org)
            person[2][0] = min(person[2][0], ts)
            person[2][1] = max(person[2][1], ts)

    access_rows = tuple(
        AccessRow(period, org, purpose, *counts)
        for (period, org, purpose), counts in sorted(access.items())
    )
    seen_periods = sorted({row.period for row in access_rows})
    periods = _dense_periods(span[0], span[1], zone, bucket) if span else []
    if not periods or not set(seen_periods) <= set(periods):
        periods = seen_periods
    return AuditReport(
        since=lo,
        until=hi,
        bucket=bucket,
        timezone=timezone,
        entries=count,
        allowed=totals[0],
        refused=totals[1],
        errors=totals[2],
        first_index=first_index,
        last_index=last_index,
        periods=tuple(periods),
        orgs=tuple(sorted({row.org for row in access_rows})),
        access=access_rows,
        refusals=tuple(
            RefusalRow(reason, c, first, last)
            for reason, (c, first, last) in sorted(refusals.items(), key=lambda r: (-r[1][0], r[0]))
        ),
        persons=tuple(
            PersonRow(p, counts[0], counts[1], counts[2], len(orgs), span_ts[0], span_ts[1])
            for p, (counts, orgs, span_ts) in sorted(persons.items())
        ),
    )


def report_json(report: AuditReport) -> dict[str, Any]:
    """The report as a JSON-ready dict (for an API response)."""
    return asdict(report)


# -- CSV ------------------------------------------------------------------------------------

_CSV_COLUMNS: Final[dict[str, tuple[str, ...]]] = {
    "access": ("period", "org", "purpose", "allowed", "refused", "errors"),
    "refusals": ("reason", "count", "first_index", "last_index"),
    "persons": (
        "subject_pseudonym", "allowed", "refused", "errors", "orgs", "first_ts", "last_ts",
    ),
}
# A cell starting with one of these is run as a formula by spreadsheet programs.
_FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: object) -> object:
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def report_csv(report: AuditReport, kind: ReportKind | str) -> str:
    """One table of ``report`` as CSV text (RFC 4180: header row, CRLF line ends), columns in
    the fixed order of ``_CSV_COLUMNS``. Text cells that a spreadsheet would run as a formula
    (starting with ``= + - @``, tab or CR) get a leading ``'``. ``ValueError`` for an unknown
    ``kind``."""
    columns = _CSV_COLUMNS.get(kind)
    if columns is None:
        raise ValueError(f"unknown report kind {kind!r}, want one of {list(REPORT_KINDS)}")
    rows: Sequence[AccessRow | RefusalRow | PersonRow]
    if kind == "access":
        rows = report.access
    elif kind == "refusals":
        rows = report.refusals
    else:
        rows = report.persons
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(getattr(row, c)) for c in columns])
    return out.getvalue()


# -- SVG chart ------------------------------------------------------------------------------

# Characters XML 1.0 does not allow, even escaped.
_XML_INVALID: Final = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_PALETTE: Final = (
    "#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#edc948",
    "#76b7b2", "#ff9da7", "#9c755f", "#e15759", "#bab0ac",
)
_WIDTH: Final = 960
_PLOT_LEFT: Final = 64
_PLOT_RIGHT: Final = 16
_PLOT_TOP: Final = 40
_PLOT_HEIGHT: Final = 280
_FONT: Final = "'Noto Sans CJK SC','Microsoft YaHei','PingFang SC',sans-serif"


def _x(text: object) -> str:
    """``text`` escaped for XML character data and attribute values."""
    clean = _XML_INVALID.sub("\ufffd", str(text))
    return html.escape(clean, quote=True)


def _nice_max(value: int) -> int:
    if value <= 5:
        return 5
    magnitude = int(10 ** math.floor(math.log10(value)))
    for step in (1, 2, 2.5, 5, 10):
        top = step * magnitude
        if top >= value:
            return math.ceil(top)
    return value  # pragma: no cover - the loop always returns


def _num(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def report_chart_svg(report: AuditReport, *, title: str | None = None) -> str:
    """Access over time as a self-contained SVG document: per period one bar per org, each bar
    stacked allowed (solid) over refused (light). One ``<g class="series" data-org=…>`` per org;
    every bar has a ``<title>`` tooltip with its counts. No scripts, no external assets."""
    periods = list(report.periods)
    orgs = list(report.orgs)
    cells: dict[tuple[str, str], list[int]] = {}
    for row in report.access:
        cell = cells.setdefault((row.period, row.org), [0, 0])
        cell[0] += row.allowed
        cell[1] += row.refused
    top = _nice_max(max((a + r for a, r in cells.values()), default=0))
    plot_w = _WIDTH - _PLOT_LEFT - _PLOT_RIGHT
    legend_rows = math.ceil((len(orgs) + 2) / 4)
    label_h = 70 if report.bucket == "day" else 95
    height = _PLOT_TOP + _PLOT_HEIGHT + label_h + 22 * legend_rows + 10
    base_y = _PLOT_TOP + _PLOT_HEIGHT
    group_w = plot_w / max(len(periods), 1)
    bar_w = group_w * 0.8 / max(len(orgs), 1)
    heading = title or (
        f"Data access by org per {report.bucket} ({report.timezone}): allowed and refused"
    )

    out: list[str] = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{height}" '
        f'viewBox="0 0 {_WIDTH} {height}" font-family="{_x(_FONT)}" font-size="12" '
        'role="img">',
        f"<title>{_x(heading)}</title>",
        f'<rect width="{_WIDTH}" height="{height}" fill="#ffffff"/>',
        f'<text x="{_PLOT_LEFT}" y="22" font-size="14" font-weight="bold">{_x(heading)}</text>',
    ]
    # y axis and grid
    for i in range(6):
        value = top * i / 5
        y = base_y - _PLOT_HEIGHT * i / 5
        out.append(
            f'<line x1="{_PLOT_LEFT}" x2="{_PLOT_LEFT + plot_w}" y1="{_num(y)}" y2="{_num(y)}" '
            f'stroke="{"#333333" if i == 0 else "#e0e0e0"}" stroke-width="1"/>'
        )
        out.append(
            f'<text x="{_PLOT_LEFT - 6}" y="{_num(y + 4)}" text-anchor="end">'
            f"{_x(_num(value))}</text>"
        )
    # x labels: at most ~24 of them
    every = max(1, math.ceil(len(periods) / 24))
    for p, period in enumerate(periods):
        if p % every:
            continue
        x = _PLOT_LEFT + group_w * (p + 0.5)
        y = base_y + 12
        out.append(
            f'<text x="{_num(x)}" y="{_num(y)}" text-anchor="end" '
            f'transform="rotate(-40 {_num(x)} {_num(y)})">{_x(period)}</text>'
        )
    # one series per org
    period_pos = {period: p for p, period in enumerate(periods)}
    for o, org in enumerate(orgs):
        color = _PALETTE[o % len(_PALETTE)]
        out.append(f'<g class="series" data-org="{_x(org)}" fill="{color}">')
        for period in periods:
            allowed, refused = cells.get((period, org), (0, 0))
            if allowed + refused == 0:
                continue
            x = _PLOT_LEFT + group_w * (period_pos[period] + 0.1) + bar_w * o
            h_allowed = _PLOT_HEIGHT * allowed / top
            h_refused = _PLOT_HEIGHT * refused / top
            tip = f"{org} · {period}: allowed {allowed}, refused {refused}"
            out.append(f"<g><title>{_x(tip)}</title>")
            if allowed:
                out.append(
                    f'<rect class="allowed" x="{_num(x)}" y="{_num(base_y - h_allowed)}" '
                    f'width="{_num(bar_w)}" height="{_num(h_allowed)}"/>'
                )
            if refused:
                out.append(
                    f'<rect class="refused" x="{_num(x)}" '
                    f'y="{_num(base_y - h_allowed - h_refused)}" width="{_num(bar_w)}" '
                    f'height="{_num(h_refused)}" fill-opacity="0.35" stroke="{color}"/>'
                )
            out.append("</g>")
        out.append("</g>")
    # legend: orgs, then the two shades
    legend_y = base_y + label_h
    items: list[tuple[str, str, str]] = [
        (org, _PALETTE[o % len(_PALETTE)], "1") for o, org in enumerate(orgs)
    ]
    items += [("allowed", "#777777", "1"), ("refused", "#777777", "0.35")]
    for i, (name, color, opacity) in enumerate(items):
        x = _PLOT_LEFT + (i % 4) * (plot_w / 4)
        y = legend_y + 22 * (i // 4)
        out.append(
            f'<rect x="{_num(x)}" y="{_num(y)}" width="12" height="12" fill="{color}" '
            f'fill-opacity="{opacity}" stroke="{color}"/>'
            f'<text x="{_num(x + 18)}" y="{_num(y + 11)}">{_x(name)}</text>'
        )
    if not periods:
        out.append(
            f'<text x="{_num(_PLOT_LEFT + plot_w / 2)}" y="{_num(base_y - _PLOT_HEIGHT / 2)}" '
            'text-anchor="middle" fill="#777777">no data access in this range</text>'
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"


# -- HTML -----------------------------------------------------------------------------------


def _html_table(caption: str, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_x(v)}</td>" for v in row) + "</tr>" for row in rows
    )
    return (
        f"<table><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table>"
    )


def report_html(report: AuditReport, *, title: str = "Audit report") -> str:
    """One self-contained HTML page: summary, the SVG chart inline and the three tables.
    Every value is escaped; no scripts, no external assets."""
    svg = report_chart_svg(report).split("\n", 1)[1]  # drop the XML declaration
    summary = (
        f"entries {report.entries} (allowed {report.allowed}, refused {report.refused}, "
        f"errors {report.errors}); indexes {report.first_index}..{report.last_index}; "
        f"range [{report.since or '-'}, {report.until or '-'}); "
        f"periods per {report.bucket} in {report.timezone}"
    )

    def rows(kind: str, data: Sequence[object]) -> list[list[object]]:
        return [[getattr(r, c) for c in _CSV_COLUMNS[kind]] for r in data]

    return "".join(
        [
            '<!DOCTYPE html><html lang="zh-CN"><head><meta charset="utf-8">',
            f"<title>{_x(title)}</title><style>",
            "body{font-family:" + _FONT + ";margin:1.5em}"
            "table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
            "caption{font-weight:bold;text-align:left}",
            f"</style></head><body><h1>{_x(title)}</h1><p>{_x(summary)}</p>",
            svg,
            _html_table("Access over time", _CSV_COLUMNS["access"],
                        rows("access", report.access)),
            _html_table("Refusals by reason", _CSV_COLUMNS["refusals"],
                        rows("refusals", report.refusals)),
            _html_table("Per-person access (pseudonyms)", _CSV_COLUMNS["persons"],
                        rows("persons", report.persons)),
            "</body></html>\n",
        ]
    )
